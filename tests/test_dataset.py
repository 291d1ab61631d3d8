"""dataset.py on real stdlib text: sources, cleaning, leak-free splits, task builders, collation,
caching and errors. Tokenization uses the project's trained CodeTokenizer."""

import ast
import dataclasses
import errno
import io
import itertools
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tokenize
from collections import Counter
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from procs import popen, signal_when

import dataset
from codelm.data import cleaning, encoding, shards
from codelm.data.cleaning import (
    clean_one,
    longest_literal,
    redact_secrets,
    strip_license_header,
)
from codelm.data.config import (
    _RUNTIME_FIELDS,
    DOCSTRING_PROMPTS,
    REFACTOR_TEMPLATE,
    DataConfig,
    DataError,
)
from codelm.data.datasets import LMWindows, collate
from codelm.data.dedupe import minhash, near_duplicates, shingles
from codelm.data.encoding import (
    _fit_fim_context,
    encode_prompts,
    fim_pairs,
    fit_prompt,
    fitted_prompt,
    prompt_prefix,
    supervised_example,
    tokenize_examples,
    tokenizer_cache_dir,
    window_pairs,
)
from codelm.data.examples import (
    Example,
    docstring_examples,
    held_out_prompt,
    line_completion_examples,
    method_examples,
)
from codelm.data.shards import clean_corpus
from codelm.data.sources import Doc, iter_sources, jsonl_lines, stdlib_files, stdlib_root
from codelm.data.splits import assign_splits, corpus_key, load_corpus, split_corpus
from codelm.runtime import console, process, settings
from codelm.tokenization.source import (
    PYTHON_PARSE_ERRORS,
    docstring_statement,
    strip_comments_and_docstrings,
)
from dataset import prepare
from tokenizer import ENCODING_VERSION, CodeTokenizer

EMAIL = stdlib_root() / "email"  # 29 real stdlib files, about 380 KB


def cfg(tmp_path, **kw) -> DataConfig:
    kw.setdefault("sources", [str(EMAIL)])
    return DataConfig(cache_dir=str(tmp_path / "cache"), progress=False, **kw)


WHOLE = dict(train_frac=1.0, val_frac=0.0, test_frac=0.0)  # every document in train


def prompt_and_completion(example: dict[str, torch.Tensor]) -> tuple[list[int], list[int]]:
    """A supervised example split back into prompt ids and completion ids (with its EOS), to
    check what the pipeline built."""
    input_ids, labels = example["input_ids"].tolist(), example["labels"].tolist()
    first = next((j for j, t in enumerate(labels) if t != -100), len(labels))
    return input_ids[: first + 1], labels[first:]


@pytest.fixture(scope="module")
def tok() -> CodeTokenizer:
    texts = [p.read_text("utf-8") for p in stdlib_files(EMAIL)]
    return CodeTokenizer.train(texts, min_freq=2)


DOCUMENTED = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def email_texts() -> dict[str, str]:
    return {
        f"email/{p.relative_to(EMAIL).as_posix()}": p.read_text("utf-8")
        for p in stdlib_files(EMAIL)
    }


def write_jsonl(path: Path, records) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def scraped_records() -> list[dict]:
    """Real stdlib files posing as scraped repos: one repo per stdlib package."""
    records = []
    for package in ("json", "email", "urllib", "logging", "concurrent", "importlib", "http"):
        root = stdlib_root() / package
        for p in stdlib_files(root):
            records.append(
                {
                    "repo": f"user/{package}",
                    "path": p.relative_to(root).as_posix(),
                    "sha": "x",
                    "license": "psf",
                    "stars": 500,
                    "text": p.read_text("utf-8"),
                }
            )
    return records


# ----------------------------------------------------------------------------- sources, cleaning


def test_stdlib_files_skip_site_packages_and_pycache(tmp_path):
    """stdlib_files lists a root's .py files in order, leaving out site-packages, dist-packages and
    __pycache__; on the real standard library it finds at least 98% of what os.walk finds."""
    for rel in (
        "os.py",
        "json/__init__.py",
        "site-packages/numpy/core.py",
        "dist-packages/x.py",
        "__pycache__/os.py",
        "json/__pycache__/y.py",
    ):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    got = [p.relative_to(tmp_path).as_posix() for p in stdlib_files(tmp_path)]
    assert got == ["json/__init__.py", "os.py"]
    # The real one: the .py files outside site-packages and __pycache__ (reference: os.walk;
    # a few symlinks, e.g. Debian's second _sysconfigdata name, may be left out), and a real
    # standard library (Debian's python3.12 without its test/ package has ~570).
    root = stdlib_root()
    expected = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in ("site-packages", "dist-packages", "__pycache__")]
        expected += [(Path(d) / f).relative_to(root).as_posix() for f in files if f.endswith(".py")]
    real = [p.relative_to(root).as_posix() for p in stdlib_files()]
    assert set(real) <= set(expected) and len(real) >= 0.98 * len(expected)
    assert len(real) > 400 and not any("site-packages" in p for p in real)


def test_a_directory_of_installed_code_is_neither_read_nor_counted_as_a_file(tmp_path):
    """A project's .venv or node_modules is another project's code: its files are not read,
    and the directory is no dropped file of the source's counts."""
    from codelm.data.sources import source_listing

    (tmp_path / ".venv" / "lib").mkdir(parents=True)
    (tmp_path / ".venv" / "lib" / "x.py").write_text("x = 1\n")
    (tmp_path / "node_modules").mkdir()
    (tmp_path / "node_modules" / "y.js").write_text("y = 1\n")
    (tmp_path / "main.py").write_text("import x\n")
    listing = source_listing(str(tmp_path), (".py",))
    assert [p.name for p in listing.files] == ["main.py"] and not listing.skipped


def test_directory_source_follows_links_to_files_and_reads_extensions_in_any_case(tmp_path):
    """Extensions match in any case (``B.PY`` is read); a directory's links to its own files are
    read, and so are an HF hub snapshot's (its files point into its repository's blobs/); a
    link out of the directory (a cloned repository's to a file elsewhere: a secret) is not, nor
    a loop of links."""
    repo = tmp_path / "datasets--org--name"
    src = repo / "snapshots" / "abc123"
    blobs = repo / "blobs"
    src.mkdir(parents=True)
    blobs.mkdir()
    (src / "B.PY").write_text('def f():\n    """Say one."""\n    return 1\n')
    (blobs / "b1").write_text("def g():\n    return 2\n")
    (src / "link.py").symlink_to(Path("..") / ".." / "blobs" / "b1")
    (src / "same.py").symlink_to("B.PY")
    (src / "dangling.py").symlink_to(tmp_path / "gone.py")
    (tmp_path / "secret.txt").write_text("TOKEN = 'outside'\n")
    (src / "settings.py").symlink_to(Path("..") / ".." / ".." / "secret.txt")
    (src / "loop_a.py").symlink_to("loop_b.py")  # a loop of links: skipped, as a dangling one
    (src / "loop_b.py").symlink_to("loop_a.py")
    (src / "itself.py").symlink_to("itself.py")
    corpus = load_corpus(cfg(tmp_path, sources=[str(src)], strip_docstrings=True,
                             min_lines=1, dedupe=False))
    docs = {d.id: d.text for d in corpus.train + corpus.val + corpus.test}
    assert docs == {"abc123/B.PY": "def f():\n    return 1\n",  # cleaned as Python
                    "abc123/link.py": "def g():\n    return 2\n",
                    "abc123/same.py": "def f():\n    return 1\n"}
    cloned = tmp_path / "clone"  # not a snapshot: its links stay inside it
    cloned.mkdir()
    (cloned / "a.py").write_text("def h():\n    return 3\n")
    (cloned / "settings.py").symlink_to(tmp_path / "secret.txt")
    corpus = load_corpus(cfg(tmp_path, sources=[str(cloned)], min_lines=1))
    assert [d.id for d in corpus.train + corpus.val + corpus.test] == ["clone/a.py"]
    assert corpus.stats["read"]["files"] == 2 and corpus.stats["dropped"] == {"symlink": 1}
    assert Doc("src/B.PY", "x = 1\n").is_python


def test_cleaning_counts_every_drop_by_reason(tmp_path):
    """Each file cleaning drops (binary, a copy, a long line or literal, not UTF-8, too
    few lines, too large) is counted under its reason, and each licence header removed
    too: the stats say where files went."""
    src = tmp_path / "src"
    src.mkdir()
    good = (EMAIL / "quoprimime.py").read_text("utf-8")
    (src / "a.py").write_text(good)
    (src / "copy_of_a.py").write_text(good)
    (src / "binary.py").write_bytes(b"x = 1\n\x00\x01\x02\n")
    (src / "latin1.py").write_bytes("s = 'caf\xe9'\ny = 2\n".encode("latin-1"))
    (src / "literal.py").write_text("x = 1\nS = '" + "\\uD83C" * 100 + "'\n")
    (src / "longline.py").write_text("x = 1\ny = [" + "1, " * 600 + "]\n")
    (src / "short.py").write_text("x = 1\n")
    (src / "big.py").write_text("x = 1\n" * 3000)
    (src / "licensed.py").write_text(
        "#!/usr/bin/env python\n# Copyright (c) 2020 Someone\n# Licensed under the MIT License.\n"
        "\nimport os\nprint(os.sep)\n"
    )
    corpus = load_corpus(cfg(tmp_path, sources=[str(src)], max_bytes=10_000))
    stats = corpus.stats
    assert stats["read"]["files"] == 9
    assert stats["dropped"] == {
        "binary": 1, "duplicate": 1, "long_line": 1, "long_literal": 1, "not_utf8": 1,
        "too_few_lines": 1, "too_large": 1,
    }  # fmt: skip
    assert stats["modified"]["license_header_removed"] == 2  # quoprimime.py has one too
    docs = {d.id: d.text for d in corpus.train + corpus.val + corpus.test}
    assert set(docs) == {"src/a.py", "src/licensed.py"}
    assert docs["src/licensed.py"] == "#!/usr/bin/env python\nimport os\nprint(os.sep)\n"
    assert good.startswith("# Copyright (C) 2001-2006 Python Software Foundation\n")
    assert docs["src/a.py"] == good.split("\n", 4)[4].lstrip("\n")


def test_a_file_over_max_bytes_is_dropped_unread(tmp_path, monkeypatch):
    """A stray multi-gigabyte file is dropped by its size, never read into memory; max_bytes is
    the size as stored, in a directory and in a scraper JSONL alike."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok.py").write_text("x = 1\ny = 2\n")
    with open(src / "generated.py", "wb") as f:
        f.truncate(1 << 30)  # sparse: no disk used
    (src / "crlf.py").write_bytes(b"x = 1\r\n" * 20)  # 140 bytes stored, 120 as text
    read = Path.read_bytes

    def read_bytes(path: Path) -> bytes:
        assert path.name != "generated.py", "read a file over max_bytes"
        return read(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    corpus = load_corpus(cfg(tmp_path, sources=[str(src)], max_bytes=130))
    assert corpus.stats["dropped"] == {"too_large": 2} and corpus.stats["read"]["files"] == 3
    scraped = write_jsonl(tmp_path / "s.jsonl", [{"repo": "u/r", "path": "crlf.py",
                                                 "text": "x = 1\r\n" * 20}])
    stats = load_corpus(cfg(tmp_path, sources=[str(src), str(scraped)],
                            max_bytes=130)).stats
    assert stats["dropped"] == {"too_large": 3}


def test_a_file_of_exactly_max_bytes_is_kept(tmp_path):
    """max_bytes is the largest size kept, as the reader's ``<=`` reads it."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text((EMAIL / "charset.py").read_text("utf-8"))
    size = (src / "a.py").stat().st_size
    docs, stats = clean_corpus(cfg(tmp_path, sources=[str(src)], max_bytes=size))
    assert [d.id for d in docs] == ["src/a.py"] and stats["dropped"] == {}
    with pytest.raises(DataError, match="dropped {'too_large': 1}"):
        clean_corpus(cfg(tmp_path, sources=[str(src)], max_bytes=size - 1))


@pytest.mark.parametrize("limit, size, past", [
    ("min_bytes", 40, 41),  # "smaller files are dropped"
    ("max_line_length", 60, 59),  # "files with a longer line are dropped"
    ("max_literal_length", 30, 29),  # the longest one-line literal
])
def test_a_file_exactly_at_a_cleaning_limit_is_kept(tmp_path, limit, size, past):
    """Each cleaning bound is inclusive like max_bytes: a file exactly at it is kept, and one
    past it is dropped (a ``<=`` or ``>=`` there would drop the file at the limit). Reference: the
    sizes computed by hand, and Python's tokenize for the literal."""
    src = tmp_path / "src"
    src.mkdir()
    if limit == "min_bytes":
        text = "x = 1\ny = 2\n" + "#" * (size - 12)
        assert len(text.encode()) == size
    elif limit == "max_line_length":
        text = "x = 1\ny = '" + "a" * (size - 6) + "'\n"
        assert max(map(len, text.splitlines())) == size
    else:
        text = "x = 1\ny = '" + "a" * (size - 2) + "'\n"
        tokens = tokenize.generate_tokens(io.StringIO(text).readline)
        assert max(len(t.string) for t in tokens if t.type == tokenize.STRING) == size
    (src / "a.py").write_text(text)
    docs, stats = clean_corpus(cfg(tmp_path, sources=[str(src)], **{limit: size}))
    assert [d.id for d in docs] == ["src/a.py"] and stats["dropped"] == {}
    with pytest.raises(DataError, match="no data left"):
        clean_corpus(cfg(tmp_path, sources=[str(src)], **{limit: past}))


def test_min_bytes_counts_a_files_utf8_bytes_not_its_characters(tmp_path):
    """min_bytes is a size in bytes, as max_bytes: a file of 28 characters whose é are two
    UTF-8 bytes each is 42 bytes, kept at min_bytes 42 and dropped at 43."""
    src = tmp_path / "src"
    src.mkdir()
    text = "x = 1\ny = 2\n# " + "é" * 14
    assert (len(text), len(text.encode())) == (28, 42)
    (src / "a.py").write_text(text, encoding="utf-8")
    docs, stats = clean_corpus(cfg(tmp_path, sources=[str(src)], min_bytes=42))
    assert [d.id for d in docs] == ["src/a.py"] and stats["dropped"] == {}
    with pytest.raises(DataError, match="no data left"):
        clean_corpus(cfg(tmp_path, sources=[str(src)], min_bytes=43))


def test_min_lines_counts_lines_of_code_not_blank_lines(tmp_path):
    """min_lines drops files with fewer non-blank lines: trailing blank lines do not lift a
    one-line file over it. Reference: a hand count (one line of code, then two)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "one.py").write_text("x = 1\n\n\n\n")
    (src / "two.py").write_text("x = 1\n\ny = 2\n")
    docs, stats = clean_corpus(cfg(tmp_path, sources=[str(src)], min_lines=2))
    assert [d.id for d in docs] == ["src/two.py"]
    assert stats["dropped"] == {"too_few_lines": 1}


def test_a_utf8_bom_is_removed_and_the_file_still_parses(tmp_path):
    """A file saved with a UTF-8 BOM (Windows editors) is the same code: the BOM stays out of
    the training text, and under strip_docstrings the file parses, not dropped as a syntax
    error. Reference: Python's utf-8-sig codec."""
    src = tmp_path / "src"
    src.mkdir()
    code = 'def f(x):\n    """Doc."""\n    return x\n'
    (src / "bom.py").write_bytes(b"\xef\xbb\xbf" + code.encode())
    (src / "ok.py").write_text("x = 1\ny = 2\n")
    corpus = load_corpus(cfg(tmp_path, sources=[str(src)], **WHOLE))
    expected = (src / "bom.py").read_text(encoding="utf-8-sig")
    assert {d.id: d.text for d in corpus.train}["src/bom.py"] == expected
    docs, stats = clean_corpus(cfg(tmp_path, sources=[str(src)], strip_docstrings=True))
    assert "syntax_error" not in stats["dropped"]
    assert ast.parse({d.id: d.text for d in docs}["src/bom.py"])


def test_old_mac_line_ends_become_newlines(tmp_path):
    """A file with lone CR line ends (classic Mac OS) is cleaned to ``\\n`` lines like a CRLF
    one. Reference: Python's universal-newlines reading of the same bytes."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "mac.py").write_bytes(b"x = 1\ry = 2\r")
    (src / "dos.py").write_bytes(b"z = 3\r\nw = 4\r\n")
    docs, stats = clean_corpus(cfg(tmp_path, sources=[str(src)]))
    expected = {}
    for p in src.iterdir():
        with open(p, encoding="utf-8") as f:  # newline=None: universal newlines
            expected[f"src/{p.name}"] = f.read()
    assert {d.id: d.text for d in docs} == expected
    assert "\r" not in "".join(expected.values()) and stats["dropped"] == {}


def test_a_pair_with_a_blank_prompt_or_a_blank_target_is_dropped(tmp_path):
    """Either side of a pair left blank leaves nothing to learn (or nothing to condition on)."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"input": "def f(x):\n", "output": "    return x\n"},
        {"input": " \n", "output": "    return 1\n"},
        {"input": "def g(x):\n", "output": "  \n"},
        {"prompt": "def h(x):\n", "completion": ""}])
    docs, stats = clean_corpus(cfg(tmp_path, sources=[str(pairs)]))
    assert [(d.text, d.target) for d in docs] == [("def f(x):\n", "    return x\n")]
    assert stats["dropped"] == {"empty_pair": 3}


def test_python_only_cleaning_leaves_other_languages_as_they_are(tmp_path):
    """strip_comments, strip_docstrings and autopep8 are Python rewrites: a Kotlin file is kept
    verbatim (stripping would drop it as a Python syntax error; autopep8 would respace it), and
    the data line says how many files the options left as they were."""
    src = tmp_path / "kt"
    src.mkdir()
    kotlin = ("package core\n\n// a comment\nfun add(a: Int,b: Int): Int {\n"
              "    val x=a+b  // sum\n    return x\n}\n")
    (src / "Add.kt").write_text(kotlin)
    (src / "b.py").write_text("import os\ndef f( a ):\n  return a  # the same\n")
    docs, stats = clean_corpus(cfg(tmp_path, sources=[str(src)], extensions=[".kt", ".py"],
                                   strip_comments=True, strip_docstrings=True,
                                   autopep8=True))
    texts = {d.id: d.text for d in docs}
    assert texts["kt/Add.kt"] == kotlin and stats["dropped"] == {}
    assert texts["kt/b.py"] == "import os\n\n\ndef f(a):\n    return a\n"  # Python is rewritten
    assert stats["modified"] == {"autopep8_changed": 1, "comments_or_docstrings_stripped": 1,
                                 "not_python_kept_as_is": 1}
    said = shards.describe_corpus({**stats, "split": {"train": 2}})  # the data line says so
    assert all(w in said for w in ("1 non-Python file kept as it is", "Python only")), said
    unasked = clean_corpus(cfg(tmp_path, sources=[str(src)], extensions=[".kt", ".py"]))[1]
    assert "non-Python" not in shards.describe_corpus({**unasked, "split": {"train": 2}})


def test_pairs_with_one_prompt_and_different_targets_are_all_kept(tmp_path):
    """A pair is its prompt and its target: another answer to the same prompt is new data, the
    same answer again is a duplicate, and a copy is byte for byte (a prompt with one more blank
    line is another prompt; reference: the distinct (input, output) tuples)."""
    records = [{"input": "def add(a, b):\n", "output": "    return a + b\n"},
               {"input": "def add(a, b):\n", "output": "    return b + a\n"},
               {"input": "def add(a, b):\n", "output": "    return a + b\n"},  # a copy
               {"input": "def add(a, b):\n\n", "output": "    return a + b\n"},
               {"input": "def plus(a, b):\n", "output": "    return a + b\n"}]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", records)
    docs, stats = clean_corpus(cfg(tmp_path, sources=[str(pairs)]))
    distinct = list(dict.fromkeys((r["input"], r["output"]) for r in records))
    assert [(d.text, d.target) for d in docs] == distinct
    assert stats["dropped"] == {"duplicate": len(records) - len(distinct)}


def test_the_bytes_read_and_kept_of_pairs_count_their_targets(tmp_path):
    """A pair's bytes, read and kept, count its input and its target, not the input alone
    (which would print a refactor corpus at half its size)."""
    records = [{"input": "x = 1\n", "output": "y = 2  # \u00e9\n" * 50},
               {"prompt": "def f():\n", "completion": "    return 1\n"}]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", records)
    docs, stats = clean_corpus(cfg(tmp_path, sources=[str(pairs)]))
    size = sum(len("".join(r.values()).encode("utf-8")) for r in records)
    assert len(docs) == 2 and stats["read"]["bytes"] == stats["kept"]["bytes"] == size


def test_near_dedupe_compares_pairs_with_their_targets(tmp_path):
    """Near-dedupe reads a pair as prompt + target, as exact dedupe does: two unlike answers to
    one prompt are no near copies (comparing prompts only would drop one). Reference: the exact
    Jaccard of the two pairs' shingle sets, under the 0.5 threshold."""
    prompt = "def solve(values):\n    # " + " ".join(f"word{i}" for i in range(15)) + "\n"
    a = "\n".join(f"    total_{i} = values[{i}] * {i}" for i in range(30))
    b = "\n".join(f"    acc{i} += other({i}, values)" for i in range(30))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"input": prompt, "output": t} for t in (a, b)])
    sa, sb = (shingles(prompt + "\n" + t) for t in (a, b))
    assert len(sa & sb) / len(sa | sb) < 0.5
    docs, stats = clean_corpus(cfg(tmp_path, sources=[str(pairs)], near_dedupe=True))
    assert len(docs) == 2 and not any(stats["dropped"].values())


def test_blank_lines_in_a_jsonl_source_are_skipped(tmp_path):
    """Blank lines (a trailing empty line, a hand-edited file) are no records and no "malformed
    JSON" error."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"input": "a", "output": "b"}, "", "  ", {"input": "c", "output": "d"}, ""])
    docs, stats = clean_corpus(cfg(tmp_path, sources=[str(pairs)]))
    assert [(d.text, d.target) for d in docs] == [("a", "b"), ("c", "d")]
    assert stats["dropped"] == {}


def test_scraper_record_ids_are_repo_slash_path(tmp_path):
    """Doc.id of a scraper record is "repo/path" (the Doc docstring): two repos' setup.py are
    two documents with their own ids, not one id twice."""
    scraped = write_jsonl(tmp_path / "scraped.jsonl", [
        {"repo": "u/a", "path": "setup.py", "text": "x = 1\ny = 2\n"},
        {"repo": "u/b", "path": "setup.py", "text": "z = 3\nw = 4\n"}])
    docs, _ = clean_corpus(cfg(tmp_path, sources=[str(scraped)]))
    assert sorted(d.id for d in docs) == ["u/a/setup.py", "u/b/setup.py"]


def test_seed_002s_file_text_records_are_code_documents(tmp_path):
    """A corpus published as {"file_text": str} lines is read as a scraper's text."""
    code = "def f(x):\n    return x + 1\n"
    raw = write_jsonl(tmp_path / "raw.jsonl", [{"file_text": code}, {"file_text": code + "#\n"},
                                               {"text": code + "##\n", "file_text": "x = 1\n"}])
    docs, _ = clean_corpus(cfg(tmp_path, sources=[str(raw)]))
    assert sorted((d.id, d.text) for d in docs) == [("raw.jsonl:1", code),
                                                    ("raw.jsonl:2", code + "#\n"),
                                                    ("raw.jsonl:3", code + "##\n")]  # text first


# Characters that str.splitlines() ends a line at and Python does not: a page break (^L) line,
# and the others inside strings and comments, where Python allows them.
ODD_BREAKS = (
    "import os\n"
    "\x0c\n"
    "SEPARATORS = '\x0b\x1c\x1d\x1e\x85\u2028\u2029'  # \u2028 in a comment\x85 too\n"
    "\n"
    "def add(a, b):\n"
    '    """Add two numbers.\x0c\n'
    "\n"
    '    Page break above."""\n'
    "    total = a + b  # \x0c\n"
    "    return total\n"
    "\x0c\n"
    "class Box:\n"
    '    """A box holding one value."""\n'
    "\n"
    "    def get(self):\n"
    '        """Return the value."""\n'
    "        return '\u2029'\n"
)


def without_docstrings(tree: ast.AST) -> str:
    """ast.dump of a tree with every docstring removed (``pass`` where it was alone)."""
    for node in ast.walk(tree):
        if isinstance(node, (*DOCUMENTED, ast.Module)) and docstring_statement(node):
            node.body = node.body[1:] or [ast.Pass()]
    return ast.dump(tree)


def test_cleaning_keeps_python_lines_at_odd_line_breaks(tmp_path):
    """Stripping comments and docstrings from a file with a page break or U+2028 gives the
    original's AST without docstrings, not text shifted by the extra "lines" (which would not
    parse, and be kept)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "odd.py").write_text(ODD_BREAKS, encoding="utf-8")
    (src / "ok.py").write_text("x = 1\ny = 2\n")
    corpus = load_corpus(cfg(tmp_path, sources=[str(src)], strip_comments=True,
                             strip_docstrings=True, train_frac=1.0, val_frac=0.0,
                             test_frac=0.0))
    assert corpus.stats["dropped"] == {}
    stripped = {d.id: d.text for d in corpus.train}["src/odd.py"]
    assert without_docstrings(ast.parse(stripped)) == without_docstrings(ast.parse(ODD_BREAKS))


def test_long_literal_counts_real_literals_not_quotes_in_comments(tmp_path):
    """A long comment with apostrophes is no long literal (reference: tokenize for Python), nor
    quotes in Kotlin's /* */ comments and KDoc lines; real long literals still drop their file,
    in Python, in Python tokenize rejects, in Kotlin after a closed comment (on its line, or
    after the */ that ends it), in C's *p = ..., and in a shell script, where /* opens no
    comment."""
    src = tmp_path / "src"
    src.mkdir()
    comment = "Don't change this: " + "the parser relies on the order of fields " * 12 + "it's ok"
    long_string = "'" + "x" * 450 + "'"
    files = {
        "comment.py": f"x = 'a'\n# {comment}\ny = 2\n",
        "comment.kt": f"val x = 'a'\n// {comment}\nval y = \"http://a.b\"  # {comment}\n",
        "unclosed.py": f"x = 'a'  # {comment}\ny = '''never closed\n",  # tokenize fails
        "string.py": f"x = 1  # it's\ny = {long_string}  # it's\n",
        "string.kt": f"val x = 1\nval y = {long_string.replace(chr(39), chr(34))} // it's\n",
        "unclosed_string.py": f"x = 1\ny = {long_string}\nz = '''never closed\n",
        # quotes in a /* */ comment or a KDoc line: no literal; code after a comment closes is
        "kdoc.kt": f"/**\n * Example: {long_string}\n */\nval x = /* {long_string} */ 1\n",
        "closed.kt": f"val w = 1\nval x = /* a */ {long_string.replace(chr(39), chr(34))}\n",
        "glob.sh": f"cp dir/* out/  # {comment}\necho {long_string}\n",  # no /* */ in shell
        "after.kt": f"/* a\n */ val s = {long_string.replace(chr(39), chr(34))}\n",
        "deref.c": f"int f(char **p) {{\n*p = {long_string.replace(chr(39), chr(34))};\n}}\n",
    }
    for name, text in files.items():
        (src / name).write_text(text)
    corpus = load_corpus(cfg(tmp_path, sources=[str(src)],
                             extensions=[".py", ".kt", ".sh", ".c"],
                             train_frac=1.0, val_frac=0.0, test_frac=0.0))
    assert sorted(d.id for d in corpus.train) == [
        "src/comment.kt", "src/comment.py", "src/kdoc.kt", "src/unclosed.py"]
    assert corpus.stats["dropped"] == {"long_literal": 7}
    for name in ("comment.py", "string.py"):
        tokens = tokenize.generate_tokens(io.StringIO(files[name]).readline)
        longest = max(len(t.string) for t in tokens if t.type in (tokenize.STRING, tokenize.NUMBER))
        assert longest_literal(files[name], python=True) == longest


def test_a_long_docstring_is_no_long_literal(tmp_path):
    """The literal limit is on one-line literals (minified data): a long multi-line docstring
    in a file that also has a long line of code is kept, not dropped as long_literal.
    Reference: tokenize, whose longest one-line literal here is under the 400 default."""
    src = tmp_path / "src"
    src.mkdir()
    doc = '"""' + "\n".join(f"Line {i} of a long explanation." for i in range(40)) + '"""\n'
    long_code = "TABLE = [" + ", ".join(str(i) for i in range(120)) + "]\n"
    assert 400 < len(long_code) < 1000
    text = doc + long_code + "x = 1\n"
    (src / "a.py").write_text(text)
    tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    literals = [t for t in tokens if t.type in (tokenize.STRING, tokenize.NUMBER)]
    assert max(len(t.string) for t in literals if t.start[0] == t.end[0]) <= 400
    assert max(len(t.string) for t in literals) > 400  # the docstring
    docs, stats = clean_corpus(cfg(tmp_path, sources=[str(src)]))
    assert [d.id for d in docs] == ["src/a.py"] and stats["dropped"] == {}


def test_license_header_forms():
    """A licence notice at the top, in each phrasing real projects use, goes and is reported
    removed; a comment that only mentions a licence is the code's own and stays."""
    kotlin = (
        "/*\n * Copyright 2010-2024 JetBrains s.r.o.\n * Apache 2.0 license.\n */\n\npackage a\n"
    )
    assert strip_license_header(kotlin) == ("package a\n", True)
    slashes = "// SPDX-License-Identifier: MIT\n// (c) me\nfun f() = 1\n"
    assert strip_license_header(slashes, "//") == ("fun f() = 1\n", True)
    plain = "# A helpful comment about the code\nx = 1\n"
    assert strip_license_header(plain) == (plain, False)
    # a comment that mentions a licence is no notice: the code's own, kept
    for mention in ("# License keys: issue and revoke them per customer\n# (checked against "
                    "the licence server).\nfrom fastapi import APIRouter\n",
                    "# Check the user's licence before serving the model\nimport fastapi\n",
                    "# Pay out under the terms of the contract\nx = 1\n"):
        assert strip_license_header(mention) == (mention, False)
    for notice in ("# Author: A. Author <a@example.org>\n# License: BSD 3 clause\n",
                   "// Use of this source code is governed by a BSD-style license that can be\n"
                   "// found in the LICENSE file.\n",
                   "# This program is free software: you can redistribute it and/or modify\n",
                   "# This Source Code Form is subject to the terms of the Mozilla Public\n"
                   "# License, v. 2.0. If a copy of the MPL was not distributed with this\n",
                   "# Distributed under the same license as SciPy itself.\n",
                   "# Released under the MIT License.\n",
                   "// Use of this source code is governed by the MIT license.\n",
                   "# This is free and unencumbered software released into the public domain.\n",
                   "# Copied from CPython 3.9, under PSF-License 2.0.\n",
                   "# From pysparklines (BSD License).\n",
                   "# For license information, see LICENSE.TXT\n"):
        marker = "#" if notice.startswith("#") else "//"
        assert strip_license_header(notice + "\nx = 1\n", marker) == ("x = 1\n", True), notice


def test_every_leading_licence_block_goes_and_a_documentation_comment_stays():
    """Licence blocks one after another (a /* */ notice, then an SPDX line; a // header in two
    paragraphs) all go, up to the first comment that mentions none; Kotlin's nested comments
    close where they nest; a /** */ block a declaration follows at once documents it: kept."""
    spdx = ("/*\n * Copyright 2024 Acme\n */\n// SPDX-License-Identifier: Apache-2.0\n\n"
            "// Helpers for strings.\npackage a\n")
    assert strip_license_header(spdx, "//") == ("// Helpers for strings.\npackage a\n", True)
    paragraphs = ("// Copyright 2024 Acme\n\n// Licensed under the Apache License 2.0;\n"
                  "// https://www.apache.org/licenses/LICENSE-2.0\n\nfun f() = 1\n")
    assert strip_license_header(paragraphs, "//") == ("fun f() = 1\n", True)
    nested = ("/*\n * Copyright 2024 Acme /* see NOTICE */\n * Licensed under MIT.\n */\n"
              "package a\n")
    assert strip_license_header(nested, "//", nested=True) == ("package a\n", True)
    kdoc = "/** Checks each file's license header. */\nclass LicenseHeaderCheck\n"
    assert strip_license_header(kdoc, "//") == (kdoc, False)
    javadoc_notice = "/**\n * Copyright 2024 Acme. MIT license.\n */\npackage a;\n"
    assert strip_license_header(javadoc_notice, "//") == ("package a;\n", True)
    # after the header, a comment that only mentions a licence is the code's own: kept
    documented = ("# Copyright 2024 Acme\n# SPDX-License-Identifier: MIT\n\n"
                  "# Reads each package's license field.\nimport os\n")
    assert strip_license_header(documented) == (
        "# Reads each package's license field.\nimport os\n", True)
    # a /** */ notice right before code is a notice, not that code's documentation
    assert strip_license_header("/** @license Copyright Google LLC. */\n'use strict';\n",
                                "//") == ("'use strict';\n", True)
    assert strip_license_header("/** Copyright 2024 Acme. */\npublic class A {}\n", "//") == (
        "public class A {}\n", True)


def test_a_notice_after_the_headers_own_comments_goes_and_they_stay():
    """A licence notice after a comment of the header's own (a linter's directive, a line on
    the project) or a Kotlin @file: annotation is removed; what comes before it stays."""
    notice = "/*\n * Copyright (C) 2018 Square, Inc.\n *\n * Licensed under the Apache License\n */\n"
    directive = "// ktlint-disable filename\n" + notice + "package okio\n"
    assert strip_license_header(directive, "//") == (
        "// ktlint-disable filename\npackage okio\n", True)
    annotated = '@file:JvmName("Utf8")\n\n' + notice + "\npackage okio\n"
    assert strip_license_header(annotated, "//") == (
        '@file:JvmName("Utf8")\n\npackage okio\n', True)
    described = "# Helpers for strings.\n\n# Copyright 2024 Acme\n# SPDX-License-Identifier: MIT\n\nx = 1\n"
    assert strip_license_header(described) == ("# Helpers for strings.\n\nx = 1\n", True)
    code_after = "/* Helpers */ fun f() = 1\n/* Copyright 2024 Acme */\n"  # code first: no header
    assert strip_license_header(code_after, "//") == (code_after, False)
    # a notice after another comment on its line is that line's: the line stays whole
    shared = "/* Helpers */\n/* generated */ /* Copyright 2020 Acme */\npackage a\n"
    assert strip_license_header(shared, "//") == (shared, False)


def test_a_kotlin_raw_strings_length_is_its_whole_text():
    """A one-line raw string (three double quotes each side) holding quotes is one literal, as
    a Python file's triple-quoted string is: a long one is a long literal."""
    payload = '{"id": 1, "data": "' + "x" * 600 + '"}'
    quotes = '"' * 3
    line = f"val payload = {quotes}{payload}{quotes}\n"
    assert longest_literal(line) == len(payload) + 6


def test_a_c_or_csharp_files_hash_lines_are_code_not_a_licence_comment(tmp_path):
    """In C, C++ and C# a line opening with # is a preprocessor line (an include guard named
    LICENSE_H, ``#region License``), never a comment: cleaning keeps it, so the file still
    compiles; the same file's // licence comment is removed, and Python's # one."""
    c_source = ("#ifndef LICENSE_CHECK_H\n#define LICENSE_CHECK_H\n#include <stdio.h>\n"
                "int licensed(void) { return printf(\"ok\\n\"); }\n#endif\n")
    csharp = "#region License\n// Copyright (c) 2007 Someone\n#endregion\n\nclass A {}\n"
    other_c = c_source.replace("licensed", "granted")  # not a copy (dedupe keeps one)
    commented = "// Copyright 2020 Someone\n// Licensed under the MIT License.\n" + other_c
    python = "# Copyright 2020 Someone\n# Licensed under the MIT License.\nimport os\n"
    src = tmp_path / "src"
    src.mkdir()
    for name, text in (("check.c", c_source), ("A.cs", csharp), ("commented.c", commented),
                       ("a.py", python)):
        (src / name).write_text(text)
    docs, _ = clean_corpus(cfg(tmp_path, sources=[str(src)], extensions=[".c", ".cs", ".py"],
                               min_bytes=0, min_lines=0))
    texts = {d.id.split("/")[-1]: d.text for d in docs}
    assert texts["check.c"] == c_source and texts["A.cs"] == csharp
    assert texts["commented.c"] == other_c
    assert texts["a.py"] == "import os\n"
    # a file of no known language (a JSONL record's id, .vue): its first line says which
    from codelm.data.cleaning import clean_one
    from codelm.data.config import CLEANING_FIELDS

    options = {key: getattr(DataConfig(), key) for key in CLEANING_FIELDS}
    for doc_id in ("corpus.jsonl:7", "app/widget.vue"):
        doc, _, modified = clean_one((Doc(doc_id, commented), options))
        assert "license_header_removed" in modified and doc.text == other_c, doc_id


def test_code_after_a_licence_comments_closing_on_its_line_is_kept():
    """Removing a licence comment keeps the code after its closing */ on the same line (a
    package declaration, a minified file's code): the comment goes, not the whole line."""
    one_line = "/* Copyright 2020 Foo, MIT license */ package com.foo\n\nfun main() {}\n"
    assert strip_license_header(one_line) == (
        "package com.foo\n\nfun main() {}\n", True)
    block = "/*\n * Copyright 2020 Foo\n * SPDX-License-Identifier: MIT\n */ package a\nx\n"
    assert strip_license_header(block) == ("package a\nx\n", True)


def test_a_licence_header_after_shebang_and_coding_line_keeps_both():
    """PEP 263: the encoding declaration may be on line 1 or 2; after a shebang it is line 2,
    and it is no part of the licence header (both lines are kept, not line 1 alone)."""
    text = ("#!/usr/bin/env python\n# -*- coding: utf-8 -*-\n# Copyright 2020 Someone\n"
            "# Licensed under the MIT License.\n\nimport os\n")
    assert strip_license_header(text) == (
        "#!/usr/bin/env python\n# -*- coding: utf-8 -*-\nimport os\n", True)


def test_strip_comments_and_docstrings_on_stdlib_file():
    """On a real stdlib file, stripping leaves valid Python with no comment token and no docstring,
    its AST equal to the original's without docstrings: the code does what it did."""
    source = (EMAIL / "base64mime.py").read_text("utf-8")
    stripped = strip_comments_and_docstrings(source, strict=True)
    tree = ast.parse(stripped)  # still valid Python
    assert ast.dump(tree).count("Constant(value='") < ast.dump(ast.parse(source)).count(
        "Constant(value='"
    )
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef):
            assert ast.get_docstring(node) is None
    kinds = {t.type for t in tokenize.generate_tokens(io.StringIO(stripped).readline)}
    assert tokenize.COMMENT not in kinds
    # Same code once docstrings and comments are gone: compare the ASTs without docstrings.
    original = ast.parse(source)
    for node in ast.walk(original):
        body = getattr(node, "body", None)
        if isinstance(body, list) and docstring_statement(node) is not None:
            node.body = body[1:] or [ast.Pass()]
    assert ast.dump(original) == ast.dump(tree)


def test_python_cleaning_options_keep_other_languages_files_and_count_them():
    """strip_comments, strip_docstrings and autopep8 read Python: a Kotlin file keeps its
    comments, counted (not_python_kept_as_is) so that the corpus stats say so."""
    kotlin = "package a\n\n/** KDoc of f. */\nfun f() = 1 // trailing comment\n"
    options = asdict(DataConfig(strip_comments=True, strip_docstrings=True, min_bytes=0,
                                min_lines=0))
    kept, reason, mods = clean_one((Doc("A.kt", kotlin), options))
    assert reason is None and kept.text == kotlin and mods == ["not_python_kept_as_is"]


def test_deeply_nested_file_is_dropped_as_a_syntax_error_not_a_crash(tmp_path, tok):
    """A file nested past the parser's limit is dropped as syntax_error by the
    Python cleaning options and skipped, counted, by the docstring and method tasks:
    one odd file does not stop a build."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.py").write_text((EMAIL / "quoprimime.py").read_text("utf-8"))
    # Valid Python nested past the parser's fixed stack (6000 levels in CPython 3.11-3.13:
    # MemoryError in ast.parse whatever the recursion limit; a chain of 6000 `+` raised
    # RecursionError on 3.11 but parses on 3.12.3+ and 3.13, whose C recursion limit is higher).
    deep = 'def g():\n    """Build."""\n    x = (\n' + "        not\n" * 10000 + "        True)\n"
    with pytest.raises(PYTHON_PARSE_ERRORS):
        ast.parse(deep)
    (src / "deep.py").write_text(deep + "    return x\n")
    whole = dict(sources=[str(src)], train_frac=1.0, val_frac=0.0, test_frac=0.0)
    for option in ("strip_comments", "strip_docstrings"):
        corpus = load_corpus(cfg(tmp_path, **whole, **{option: True}))
        assert corpus.stats["dropped"] == {"syntax_error": 1}
        assert [d.id for d in corpus.train] == ["src/good.py"]
    for task in ("docstring", "method"):  # kept by cleaning, skipped (and counted) by the task
        data = prepare(cfg(tmp_path, **whole, task=task, docstring_targets="function"), tok)
        assert data.stats["task"]["events"]["train"]["skipped_syntax_error_file"] == 1
        assert len(data.train) > 0


def test_autopep8_formats(tmp_path):
    """autopep8=True rewrites a file's indentation, argument spacing and blank lines in PEP 8
    layout, and the corpus stats count it as autopep8_changed."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "ugly.py").write_text("import os\ndef f( a,b ):\n  return a+b\nx=f(1,2)\n")
    corpus = load_corpus(
        cfg(tmp_path, sources=[str(src)], autopep8=True, val_frac=0, test_frac=0, train_frac=1)
    )
    assert corpus.train[0].text == "import os\n\n\ndef f(a, b):\n    return a+b\n\n\nx = f(1, 2)\n"
    assert corpus.stats["modified"] == {"autopep8_changed": 1}


def test_a_near_copy_is_flagged_and_a_different_file_is_not():
    """near_duplicates flags the later of two texts that differ by one renamed function, and not a
    different file: only the copy is marked, the first of the pair is kept."""
    base = (EMAIL / "charset.py").read_text("utf-8")
    variant = base.replace("def get_body_encoding", "def body_encoding_of", 1)
    other = (EMAIL / "utils.py").read_text("utf-8")
    assert near_duplicates([base, other, variant]) == {2}
    assert near_duplicates([base, other]) == set()


def test_near_dedupe_drops_the_near_copy_from_the_corpus(tmp_path):
    """clean_corpus(near_dedupe=True) removes the later of two near copies, not only counts it;
    the reference is the exact Jaccard of the shingle sets, which MinHash only estimates."""
    src = tmp_path / "src"
    src.mkdir()
    base = (EMAIL / "charset.py").read_text("utf-8")
    texts = {"a.py": base, "b.py": base.replace("def get_body_encoding", "def body_encoding_of", 1),
             "c.py": (EMAIL / "utils.py").read_text("utf-8")}
    for name, text in texts.items():
        (src / name).write_text(text)

    def jaccard(x: str, y: str) -> float:
        sx, sy = shingles(texts[x]), shingles(texts[y])
        return len(sx & sy) / len(sx | sy)

    assert jaccard("a.py", "b.py") > 0.85 > max(jaccard("a.py", "c.py"), jaccard("b.py", "c.py"))
    docs, stats = clean_corpus(cfg(tmp_path, sources=[str(src)], near_dedupe=True))
    assert [d.id for d in docs] == ["src/a.py", "src/c.py"]
    assert stats["dropped"] == {"near_duplicate": 1} and stats["kept"]["files"] == 2
    docs, stats = clean_corpus(cfg(tmp_path, sources=[str(src)]))
    assert len(docs) == 3 and stats["dropped"] == {}  # off by default


def test_near_duplicates_at_threshold_one_drops_exact_copies():
    """Texts are near duplicates at an estimated similarity >= threshold: at 1.0 (the top of
    its allowed range) an identical copy, whose signatures agree everywhere, is dropped."""
    text = (EMAIL / "charset.py").read_text("utf-8")
    other = (EMAIL / "utils.py").read_text("utf-8")
    assert near_duplicates([text, other, text], threshold=1.0) == {2}


def test_a_text_near_only_a_dropped_near_copy_is_kept():
    """Near-dedupe compares each text with the texts kept so far: C, near B but not A, stays
    when B is dropped as a near copy of A (nothing like C would be left otherwise). Reference:
    the exact Jaccard of the shingle sets, 0.6 for A-B and B-C and 0.33 for A-C."""
    units = ["\n".join(f"u{k}_{i}" for i in range(200)) for k in range(6)]
    a, b, c = ("\n".join(units[i : i + 4]) for i in range(3))

    def jaccard(x: str, y: str) -> float:
        sx, sy = shingles(x), shingles(y)
        return len(sx & sy) / len(sx | sy)

    assert min(jaccard(a, b), jaccard(b, c)) > 0.55 and jaccard(a, c) < 0.35
    assert near_duplicates([a, b, c], threshold=0.45, num_perm=256) == {1}


def test_a_candidate_sharing_a_band_with_another_kept_signature_is_still_compared():
    """Two kept signatures equal in one band are both candidates of a signature equal to them
    there, and the best estimate decides: C, equal to A in band 0 and in 7 of 8 values of every
    other band (datasketch's estimate 0.879), is a near copy of A at 0.85 though B, kept after
    A, shares band 0 too and estimates 8/256 alone."""
    import datasketch
    import numpy as np

    from codelm.data.dedupe import NearDuplicateIndex

    index = NearDuplicateIndex(0.85)
    assert index.rows == 8
    a = np.arange(256, dtype=np.uint32)
    b = a.copy()
    b[8:] += 1000
    c = a.copy()
    c[8::8] += 2000  # the first value of every band but band 0
    assert index.keep_if_new(a) and index.keep_if_new(b)
    scheme = minhash("x").scheme  # the signatures' own hashing
    estimate = datasketch.MinHash(num_perm=256, hashvalues=a, scheme=scheme).jaccard(
        datasketch.MinHash(num_perm=256, hashvalues=c, scheme=scheme))
    assert estimate == pytest.approx(225 / 256) and estimate >= 0.85
    assert not index.keep_if_new(c)


def test_lsh_bands_are_the_longest_a_pair_at_the_threshold_shares_one_of_at_0_999():
    """Each threshold's band length is the longest power of two at which a pair of Jaccard
    exactly the threshold still shares some band with probability 0.999 (1 - (1 - t^r)^(b)),
    so a near copy at the threshold is missed at most once in a thousand: 8 values at 0.85, 2
    at 0.45."""
    from codelm.data.dedupe import _band_rows

    def shares_a_band(t: float, rows: int) -> float:
        return 1 - (1 - t ** rows) ** (256 // rows)

    assert (_band_rows(0.85, 256), _band_rows(0.45, 256)) == (8, 2)
    for t in (0.95, 0.9, 0.85, 0.8, 0.7, 0.5, 0.45):
        rows = _band_rows(t, 256)
        assert shares_a_band(t, rows) >= 0.999 > shares_a_band(t, 2 * rows), t


def test_a_text_shorter_than_a_shingle_is_one_shingle_and_no_copy_of_another():
    """A text of fewer than five words is one shingle of them all, so two different short
    texts are no near copies (an empty set would make every short text alike), and the same
    one is."""
    assert shingles("x = 1") == {"x = 1"}
    assert near_duplicates(["x = 1", "y = 2", "x = 1"]) == {2}


def test_shingles_count_punctuation_marks_as_words():
    """Operators and brackets are words of a shingle, so code differing only in its operators
    has other shingles."""
    assert shingles("f(a, b)") == {"f ( a , b", "( a , b )"}
    assert not shingles("return a + b - c") & shingles("return a * b / c")


def test_a_crowd_of_similar_files_keeps_those_below_the_threshold():
    """2,000 migrations sharing their boilerplate, none a near copy of another (true Jaccard
    of each to any other about 0.6, at most 0.8): each meets hundreds of candidates, and the
    best of that many estimates must not pass 0.85 by chance. 256 values keep all but a
    few (64 values, as datasketch's default, drop 63)."""
    rng = random.Random(0)
    head = ("from django.db import migrations, models\n\nclass Migration(migrations.Migration):\n"
            "    dependencies = [('app', '0001_initial')]\n    operations = [\n")
    shared = "".join(f"        migrations.AlterField(model_name='shared', name='x{k}', "
                     "field=models.IntegerField()),\n" for k in range(8))

    def migration() -> str:
        added = "".join(f"        migrations.AddField(model_name='m{rng.randrange(50)}', "
                        f"name='f{rng.randrange(10**6)}', field=models.CharField("
                        f"max_length={rng.randrange(300)})),\n" for _ in range(2))
        return head + added + shared + "    ]\n"

    texts = [migration() for _ in range(2000)]
    dropped = near_duplicates(texts)
    sets = [shingles(text) for text in texts]
    for i in dropped:  # each a false positive, near the threshold
        assert 0.75 < max(len(sets[i] & sets[j]) / len(sets[i] | sets[j]) for j in range(i)) < 0.85
    assert len(dropped) <= 4


# Real stdlib pairs: two codecs sharing boilerplate (Jaccard ~0.7), two unrelated files
# (~0.001), two code pages (~0.94). Modules every CPython 3.11+ ships, Debian's stdlib package too
# (ctypes/test moved to test/ in 3.12, which Debian ships apart; lib2to3 went in 3.13).
MINHASH_PAIRS = (
    ("encodings/utf_16.py", "encodings/utf_32.py"),
    ("ctypes/_aix.py", "sqlite3/dbapi2.py"),
    ("encodings/cp866.py", "encodings/cp1125.py"),
)


def test_minhash_estimates_the_jaccard_of_real_files():
    """The signatures estimate the exact Jaccard of the shingle sets, and unrelated files are no
    near-duplicates."""
    root = stdlib_root()
    for a, b in MINHASH_PAIRS:
        ta, tb = (root / a).read_text("utf-8"), (root / b).read_text("utf-8")
        sa, sb = shingles(ta), shingles(tb)
        true = len(sa & sb) / len(sa | sb)
        estimate = minhash(ta, num_perm=128).jaccard(minhash(tb, num_perm=128))
        assert abs(estimate - true) < 0.1, (a, b, true, estimate)
    assert near_duplicates([(root / f).read_text("utf-8") for f in MINHASH_PAIRS[1]]) == set()


def test_cleaning_streams_the_sources(tmp_path, monkeypatch):
    """A file is cleaned before the next is read: memory holds kept documents, never the whole
    raw corpus beside them."""
    read_so_far = []

    def counting_reader(*args):
        for raw in iter_sources(*args):
            read_so_far.append(raw.id)
            yield raw

    def clean_and_check(work):
        assert read_so_far[-1] == work[0].id  # nothing read ahead
        return clean_one(work)

    monkeypatch.setattr(shards, "iter_sources", counting_reader)
    monkeypatch.setattr(shards, "clean_one", clean_and_check)
    corpus = load_corpus(cfg(tmp_path))
    assert corpus.stats["read"]["files"] == len(read_so_far) == len(stdlib_files(EMAIL))


def test_parallel_cleaning_matches_serial(tmp_path, email_with_drops):
    """Same documents, same order, same counts; drops happen both before cleaning (too large,
    a copy) and in it (too few lines, a copy once cleaned)."""
    src = email_with_drops
    one = load_corpus(cfg(tmp_path / "a", sources=[str(src)], num_workers=1))
    two = load_corpus(cfg(tmp_path / "b", sources=[str(src)], num_workers=2))
    assert [d.text for d in one.train] == [d.text for d in two.train]
    assert one.stats == two.stats
    assert one.stats["dropped"]["duplicate"] == 2 and one.stats["dropped"]["too_large"] == 1


# ----------------------------------------------------------------------------- splits


def test_split_by_repo_has_no_repo_in_two_splits_and_is_stable(tmp_path, capsys):
    """Split by repo, no repository has files in two splits and a second load
    gives the same splits; a source of one repo is split by file, with a note
    saying why, which pair records never get."""
    scraped = write_jsonl(tmp_path / "scraped.jsonl", scraped_records())
    c = cfg(tmp_path, sources=[str(scraped)], use_cache=False)
    first = load_corpus(c)
    repos = {s: {d.repo for d in getattr(first, s)} for s in ("train", "val", "test")}
    assert all(repos.values())
    assert not (
        repos["train"] & repos["val"]
        or repos["train"] & repos["test"]
        or repos["val"] & repos["test"]
    )
    assert first.stats["split_by"] == "repo"
    assert shards.describe_corpus(first.stats).endswith(" by repo")
    second = load_corpus(c)
    for s in ("train", "val", "test"):
        assert [d.id for d in getattr(first, s)] == [d.id for d in getattr(second, s)]
    # One repo cannot fill three splits: its files are split instead, still without overlap.
    one = write_jsonl(
        tmp_path / "one.jsonl", [r for r in scraped_records() if "email" in r["repo"]]
    )
    single = load_corpus(cfg(tmp_path, sources=[str(one)]))
    assert single.stats["split_by"] == "file"
    assert "by file (the sources hold fewer repositories than splits)" in shards.describe_corpus(
        single.stats)
    assert [len(single.train), len(single.val), len(single.test)] == [22, 3, 3]
    assert dataset.main(["--sources", str(one), "--cache-dir", str(tmp_path / "cache"),
                         "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "note: split by file, not repo" in err and "fewer repositories than splits" in err, err
    # pair records hold no repository: their split by file is no fallback to name
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"input": f"x = {i}\n", "output": f"y = {i}\n"}
                                                   for i in range(30)])
    assert dataset.main(["--sources", str(pairs), "--cache-dir", str(tmp_path / "cache"),
                         "--no-progress"]) == 0
    assert "fewer repositories" not in capsys.readouterr().err


def test_split_by_file_has_no_file_in_two_splits_and_ignores_order(tmp_path):
    """Split by file, each document is in one split (22/3/3 of the email
    package), and assign_splits depends on the keys and the seed, not their
    order: the same files give the same splits."""
    corpus = load_corpus(cfg(tmp_path, split_by="file"))
    ids = [d.id for s in ("train", "val", "test") for d in getattr(corpus, s)]
    assert len(ids) == len(set(ids)) == corpus.stats["kept"]["files"]
    assert [len(corpus.train), len(corpus.val), len(corpus.test)] == [22, 3, 3]
    keys = sorted(ids)
    a = assign_splits(keys)
    assert a == assign_splits(list(reversed(keys)))
    assert a != assign_splits(keys, seed=7)


def test_three_keys_give_one_to_each_split():
    """assign_splits: "val and test each get at least one key when there are enough keys":
    three repos give one to each split (a three-repo corpus still has val and test); two
    stay in train."""
    out = assign_splits(["a", "b", "c"], (0.8, 0.1, 0.1), seed=42)
    assert sorted(out.values()) == ["test", "train", "val"]
    out = assign_splits(["a", "b"], (0.8, 0.1, 0.1), seed=42)
    assert sorted(out.values()) == ["train", "train"]


def test_split_by_file_splits_a_repos_files_by_their_ids(tmp_path):
    """split_by="file" is per file even where the records name their repo (a repo's files
    land in several splits). Reference: assign_splits over the document ids."""
    scraped = write_jsonl(tmp_path / "scraped.jsonl", scraped_records())
    corpus = load_corpus(cfg(tmp_path, sources=[str(scraped)], split_by="file"))
    assert corpus.stats["split_by"] == "file"
    got = {d.id: s for s in ("train", "val", "test") for d in getattr(corpus, s)}
    assert got == assign_splits(got, (0.8, 0.1, 0.1), seed=42)
    by_repo = {}
    for s in ("train", "val", "test"):
        for d in getattr(corpus, s):
            by_repo.setdefault(d.repo, set()).add(s)
    assert any(len(splits) > 1 for splits in by_repo.values())


def test_three_repos_are_split_by_repo_one_each():
    """Three repos are enough for three splits: the file fallback is for fewer repos."""
    docs = [Doc(f"u/r{r}/m{i}.py", f"x = {r}{i}\n", repo=f"u/r{r}")
            for r in range(3) for i in range(4)]
    out, unit = split_corpus(docs, DataConfig())
    assert unit == "repo"
    assert sorted(len({d.repo for d in out[s]}) for s in ("train", "val", "test")) == [1, 1, 1]
    assert sorted(map(len, out.values())) == [4, 4, 4]
    two = [d for d in docs if d.repo != "u/r2"]
    assert split_corpus(two, DataConfig())[1] == "file"


def _repo_docs(files_per_repo: dict[str, int]) -> list[Doc]:
    """Documents of equal size, ``files_per_repo[repo]`` of each repo, distinct texts."""
    return [Doc(f"{repo}/m{i}.py", f"def f{i}():\n    return {i!r}\n" * 20 + f"# {repo}\n",
                repo=repo)
            for repo, n in files_per_repo.items() for i in range(n)]


def test_a_repository_holding_most_of_the_text_outside_train_is_noted(tmp_path, capsys):
    """Ten repositories split 8/1/1 by count, the one drawn to val holding most of the text:
    the train split holds far less than train_frac of the corpus's bytes (its JSONL bytes,
    recorded per split), which dataset.py says with the fixes; repositories of one size say
    nothing."""
    repos = [f"u/r{r}" for r in range(10)]
    val_repo = next(repo for repo, split in assign_splits(repos, (0.8, 0.1, 0.1), 42).items()
                    if split == "val")

    def records(big: str | None) -> Path:
        rows = [{"text": f"def f(x):\n    return x + {r}\n" * (400 if repo == big else 20),
                 "repo": repo, "path": "m.py"} for r, repo in enumerate(repos)]
        return write_jsonl(tmp_path / f"{big is not None}.jsonl", rows)

    argv = ["--cache-dir", str(tmp_path / "cache"), "--no-progress", "--sources"]
    assert dataset.main([*argv, str(records(None))]) == 0
    assert "the train split holds" not in capsys.readouterr().err
    assert dataset.main([*argv, str(records(val_repo))]) == 0
    err = capsys.readouterr().err
    assert "train split holds 31% of the corpus's bytes" in err and "(8 of 10 " in err, err
    assert "train_frac 0.8" in err and "--split-by file" in err
    corpus = load_corpus(cfg(tmp_path, sources=[str(tmp_path / "True.jsonl")]))
    sizes = corpus.stats["split_bytes"]
    assert sizes == {s: getattr(corpus, s).path.stat().st_size for s in ("train", "val", "test")}


def test_the_lopsided_note_is_for_a_train_split_under_three_quarters_of_train_frac():
    """The note's bound is 0.75 x train_frac of the files: with train_frac 0.5, 38 of 100
    files in train is near the 37.5 asked for and says nothing, 37 is noted; with 0.8 the bound
    is 60 files, exactly 60 not under it. The same bound holds for the corpus's bytes."""
    from codelm.data.splits import lopsided_note

    def stats(train: int, train_bytes: int = 100) -> dict:
        return {"split": {"train": train, "val": 100 - train, "test": 0},
                "split_bytes": {"train": train_bytes, "val": 100 - train_bytes, "test": 0}}

    half = DataConfig(train_frac=0.5, val_frac=0.25, test_frac=0.25)
    assert lopsided_note(stats(38, 38), half) is None
    assert "37 of 100 files/records" in lopsided_note(stats(37), half)
    assert "37% of the corpus's bytes" in lopsided_note(stats(38, 37), half)
    assert lopsided_note(stats(60, 60), DataConfig()) is None
    assert "59 of 100" in lopsided_note(stats(59), DataConfig())


def test_a_split_by_repo_near_its_fractions(capsys):
    """Twenty repos of one size: 16 / 2 / 2 repos are the 80 / 10 / 10 asked."""
    out, unit = split_corpus(_repo_docs({f"u/r{r}": 3 for r in range(20)}), DataConfig())
    assert unit == "repo" and [len(out[s]) for s in ("train", "val", "test")] == [48, 6, 6]
    assert capsys.readouterr().err == ""


def test_negative_split_fractions_are_refused_even_when_they_sum_to_one(tmp_path):
    """Fractions 1.2, -0.1 and -0.1 sum to 1 and are still refused: no split holds a negative
    share, and the error says each must be >= 0."""
    with pytest.raises(DataError, match=r"split fractions must be >= 0 and sum to 1"):
        cfg(tmp_path, train_frac=1.2, val_frac=-0.1, test_frac=-0.1).validate()


def test_predefined_val_and_test_files_are_those_splits_and_stay_out_of_training(tmp_path):
    """A train file and a validation file: the validation file's records are
    exactly the val split, the train file fills the rest by the fractions, a record in both files
    never reaches training, and a file in two roles or a val file left empty is an error."""
    pairs = [{"input": f"def f{i}(x):\n    return x + {i}\n",
              "output": f"def f{i}(x):\n    return {i} + x\n"} for i in range(40)]
    train = write_jsonl(tmp_path / "train.jsonl", pairs[:30] + pairs[30:32])  # two leaked
    val = write_jsonl(tmp_path / "validation.jsonl", pairs[30:40])
    test = write_jsonl(tmp_path / "test.jsonl", pairs[:5])

    def outputs(docs):
        return sorted(d.target for d in docs)

    all_train = cfg(tmp_path, task="refactor", sources=[str(train)], val_sources=[str(val)],
                    train_frac=0.9, val_frac=0.1, test_frac=0.0)
    corpus = load_corpus(all_train)
    assert outputs(corpus.val) == outputs(Doc("", "", target=p["output"])
                                          for p in pairs[30:40])
    assert len(corpus.train) == 30 and not corpus.test
    assert not {d.target for d in corpus.train} & {d.target for d in corpus.val}
    assert corpus.stats["dropped"]["duplicate"] == 2
    # Default fractions: the train file also gives the test split (10% of its documents).
    split = load_corpus(cfg(tmp_path, task="refactor", sources=[str(train)],
                            val_sources=[str(val)]))
    assert len(split.val) == 10 and (len(split.train), len(split.test)) == (27, 3)
    both = load_corpus(cfg(tmp_path, task="refactor", sources=[str(train)],
                           val_sources=[str(val)], test_sources=[str(test)]))
    assert outputs(both.test) == sorted(p["output"] for p in pairs[:5])
    assert len(both.train) == 25 and len(both.val) == 10
    # The same file as train and validation data, and a validation file cleaning empties.
    with pytest.raises(DataError, match="is in both val_sources and sources"):
        cfg(tmp_path, task="refactor", sources=[str(train)],
            val_sources=[str(tmp_path / "." / "train.jsonl")]).validate()
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"input": " ", "output": "x"}])
    with pytest.raises(DataError, match=r"val_sources .* left no val documents .*empty_pair"):
        load_corpus(cfg(tmp_path, task="refactor", sources=[str(train)],
                        val_sources=[str(empty)]))


def test_max_docs_reads_at_most_n_documents_of_each_role(tmp_path):
    """A smoke run with a predefined val split still trains: max_docs caps sources, val_sources
    and test_sources each, not all of them together in the order they are read."""
    records = [{"repo": f"u/v{i}", "path": "v.py", "text": f"def v{i}(x):\n    return x * {i}\n"}
               for i in range(33)]
    val = write_jsonl(tmp_path / "val.jsonl", records[:30])
    test = write_jsonl(tmp_path / "test.jsonl", records[30:])
    corpus = load_corpus(cfg(tmp_path, val_sources=[str(val)], test_sources=[str(test)],
                             max_docs=20))
    assert corpus.stats["read"]["files"] == 20 + 20 + 3
    assert len(corpus.val) == 20 and len(corpus.test) == 3
    assert len(corpus.train) + sum(corpus.stats["dropped"].values()) == 20  # all from sources


def test_a_copy_of_a_val_document_leaves_sources_even_without_dedupe(tmp_path):
    """dedupe=False keeps duplicates inside `sources`, never a copy of a val/test document."""
    pairs = [{"input": f"def f{i}(x):\n    return x+{i}\n",
              "output": f"def f{i}(x):\n    return x + {i}\n"} for i in range(6)]
    train = write_jsonl(tmp_path / "train.jsonl", pairs + pairs[:1])  # pairs[0] twice
    val = write_jsonl(tmp_path / "validation.jsonl", pairs[2:4])
    corpus = load_corpus(cfg(tmp_path, task="refactor", sources=[str(train)],
                             val_sources=[str(val)], dedupe=False, train_frac=1.0,
                             val_frac=0.0, test_frac=0.0))
    assert sorted(d.target for d in corpus.val) == [p["output"] for p in pairs[2:4]]
    assert sorted(d.target for d in corpus.train) == sorted(
        p["output"] for p in pairs[:2] + pairs[4:] + pairs[:1])
    assert corpus.stats["dropped"] == {"duplicate": 2}


def test_a_document_in_val_and_test_sources_stays_in_val_only_without_dedupe(tmp_path):
    """Even with dedupe=False a document is in one held-out split only: in both it would leak
    between val and test."""
    pairs = [{"input": f"def f{i}(x):\n    return x+{i}\n",
              "output": f"def f{i}(x):\n    return x + {i}\n"} for i in range(8)]
    train = write_jsonl(tmp_path / "train.jsonl", pairs[:4])
    val = write_jsonl(tmp_path / "validation.jsonl", pairs[4:6] + pairs[4:5])  # one twice
    test = write_jsonl(tmp_path / "test.jsonl", pairs[5:8])
    corpus = load_corpus(cfg(tmp_path, task="refactor", sources=[str(train)],
                             val_sources=[str(val)], test_sources=[str(test)],
                             dedupe=False))
    outputs = [p["output"] for p in pairs]
    assert sorted(d.target for d in corpus.val) == sorted(outputs[4:6] + outputs[4:5])
    assert sorted(d.target for d in corpus.test) == outputs[6:8]
    assert corpus.stats["dropped"] == {"duplicate": 1}


def test_copies_kept_without_dedupe_share_one_split_whatever_their_file_or_repo_draws(
        tmp_path):
    """dedupe=False keeps a file's copies; split by fraction, each copy goes where its first
    copy went, as with split_by file and by repo: a test file's copy trained on would flatter
    the test. Every copy is kept."""
    records = []
    for i in range(24):
        text = f"def f{i}(x):\n    y = x * {i}\n    return y + {i}\n"
        for repo in (f"u/r{i % 6}", f"u/r{(i + 1) % 6}"):  # six repos, each file in two
            records.append({"repo": repo, "path": f"m{i}.py", "text": text, "license": "MIT"})
    source = write_jsonl(tmp_path / "files.jsonl", records)
    for split_by in ("file", "repo"):
        corpus = load_corpus(cfg(tmp_path / split_by, sources=[str(source)], dedupe=False,
                                 split_by=split_by, train_frac=0.5, val_frac=0.25,
                                 test_frac=0.25, min_lines=1, min_bytes=0))
        splits_of = {}
        for split in ("train", "val", "test"):
            for doc in getattr(corpus, split):
                splits_of.setdefault(doc.text, set()).add(split)
        assert len(splits_of) == 24 and all(len(s) == 1 for s in splits_of.values()), split_by
        assert sum(corpus.stats["split"].values()) == 48, split_by
        assert len({split for s in splits_of.values() for split in s}) > 1  # split at all
        assert corpus.stats["split_by"] == split_by


def test_git_lfs_pointers_are_dropped_as_the_collectors_drop_them(tmp_path):
    """A clone without git-lfs leaves 3-line pointer files where the content should be; they
    pass every other cleaning rule, so they are dropped by their shape, never trained on."""
    pointer = ("version https://git-lfs.github.com/spec/v1\noid sha256:"
               + "4d7a2146" * 8 + "\nsize 12345\n")
    src = tmp_path / "proj"
    src.mkdir()
    (src / "model.py").write_text(pointer)
    (src / "main.py").write_text("def main():\n    return 1\n")
    scraped = write_jsonl(tmp_path / "scraped.jsonl", [
        {"repo": "u/r", "path": "weights.py", "text": pointer},
        {"repo": "u/r", "path": "ok.py", "text": "def ok():\n    return 2\n"}])
    for source in (src, scraped):
        corpus = load_corpus(cfg(tmp_path, sources=[str(source)], min_lines=1,
                                 train_frac=1.0, val_frac=0.0, test_frac=0.0))
        assert len(corpus.train) == 1 and corpus.stats["dropped"] == {"lfs_pointer": 1}


def test_split_is_the_same_in_another_process_and_hash_seed():
    """assign_splits gives the same splits in another process with another PYTHONHASHSEED: the
    splits rest on a stable hash, so val and test stay held out from run to run."""
    keys = [f"repo{i}/file.py" for i in range(50)]
    here = assign_splits(keys)
    code = ("import json; from codelm.data.splits import assign_splits; "
            f"print(json.dumps(assign_splits({keys!r})))")
    env = {
        **os.environ,
        "PYTHONHASHSEED": "12345",
        "PYTHONPATH": str(Path(dataset.__file__).parent),
    }
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == here


# ----------------------------------------------------------------------------- collation


def test_supervised_example_masks_prompt_and_cuts_it_from_the_left():
    """A supervised example's prompt labels are -100, and a prompt too long loses its left
    end; a completion longer than the window keeps its start beside half a window of
    prompt, after max_completion_tokens."""
    prompt, completion = list(range(10, 20)), [31, 32, 33]
    ex = supervised_example(prompt, completion, max_length=8)
    seq = prompt[-6:] + completion  # 9 tokens = max_length + 1; the prompt lost its left end
    assert ex["input_ids"].tolist() == seq[:-1]
    assert ex["labels"].tolist() == [-100] * 5 + [31, 32, 33]
    assert prompt_and_completion(ex) == (prompt[-6:], completion)
    # A completion longer than the window keeps its start, beside half the window of prompt
    # (a prompt cut to one token would condition nothing).
    ex = supervised_example(prompt, list(range(50, 70)), max_length=8)
    assert ex["input_ids"].tolist() == [16, 17, 18, 19] + list(range(50, 54))
    assert ex["labels"].tolist() == [-100] * 3 + list(range(50, 55))
    short = supervised_example([7, 8], list(range(50, 70)), max_length=8)  # all of a short one
    assert short["input_ids"].tolist() == [7, 8] + list(range(50, 56))
    # max_completion_tokens caps the completion first.
    ex = supervised_example(prompt, list(range(50, 70)), max_length=8, max_completion_tokens=2)
    assert ex["labels"].tolist() == [-100] * 6 + [50, 51]


def test_supervised_example_start_is_kept_within_the_context():
    """``start`` (a template's BOS, eval.py's prompt prefix) goes before the prompt, uncut,
    inside max_length: the prompt's left end gives way, and start's target is masked too."""
    prompt, completion = list(range(10, 20)), [31, 32]
    ex = supervised_example(prompt, completion, max_length=8, start=[1])
    assert ex["input_ids"].tolist() == [1, 14, 15, 16, 17, 18, 19, 31]
    assert ex["labels"].tolist() == [-100] * 6 + [31, 32]
    long = supervised_example(prompt, list(range(50, 70)), max_length=8, start=[1])
    bare = supervised_example(prompt, list(range(50, 70)), max_length=7)
    assert long["input_ids"].tolist() == [1, *bare["input_ids"].tolist()]
    assert long["labels"].tolist() == [-100, *bare["labels"].tolist()]


def test_a_template_written_prompt_keeps_its_template_prefix_else_its_bos_as_its_start():
    """The start a chat prompt keeps when a long history is cut: the tokenizer's template
    prefix where the ids open with it, else one BOS where they open with it, else nothing."""
    import types

    from codelm.data.encoding import template_start_length

    bos_only = types.SimpleNamespace(template_prefix=[], bos_id=1)
    assert template_start_length([1, 5, 6], bos_only) == 1
    assert template_start_length([5, 1, 6], bos_only) == 0
    with_prefix = types.SimpleNamespace(template_prefix=[1, 9], bos_id=1)
    assert template_start_length([1, 9, 5], with_prefix) == 2
    assert template_start_length([1, 5, 9], with_prefix) == 1
    no_bos = types.SimpleNamespace(template_prefix=[], bos_id=None)
    assert template_start_length([1, 5], no_bos) == 0


def test_fit_prompt_cuts_only_what_does_not_fit():
    """A prompt that fits is kept whole, at any room from its length up; one that
    does not loses the end of its code span first, so the instruction around the
    code survives, then its left end."""
    prompt = list(range(10))
    for room in (10, 11, 19, 100):  # room for all of it (between 1x and 2x too, not only the tail)
        assert fit_prompt(prompt, room) == prompt
        assert fit_prompt(prompt, room, (2, 8)) == prompt
    assert fit_prompt(prompt, 6) == prompt[4:]
    assert fit_prompt(prompt, 6, (2, 8)) == [0, 1, 2, 3, 8, 9]  # the code's end first
    assert fit_prompt(prompt, 3, (2, 8)) == [1, 8, 9]  # then the left end
    assert fit_prompt(prompt, 0) == []


def test_collate_pads_right_with_pad_id_and_ignored_labels():
    """collate pads inputs on the right with pad_id and labels with -100, as long
    tensors, so a batch's shifted-label cross-entropy is the mean NLL of its completion
    tokens alone (computed by hand)."""
    a = supervised_example([5, 6, 7], [8, 9], max_length=16)
    b = supervised_example([5], [8], max_length=16)
    batch = collate([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [5, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 8, 9], [8, -100, -100, -100]]
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    # Reference: the causal-LM loss with shifted labels equals the mean NLL of completion tokens.
    logits = torch.randn(2, 4, 12)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
    logp = logits.log_softmax(-1)
    ref = -(logp[0, 2, 8] + logp[0, 3, 9] + logp[1, 0, 8]) / 3
    torch.testing.assert_close(loss, ref)


def test_lm_windows_of_a_split_shorter_than_a_block_and_their_bounds(tmp_path):
    """A split with fewer tokens than block_size still gives one (short) training window, the
    sequential windows cover every token once, and an index out of range (negative too) is an
    IndexError, not a window read from the wrong place. Reference: slices of the token list."""
    tokens = list(range(100, 110))
    path = tmp_path / "t.bin"
    np.asarray(tokens, dtype=np.uint16).tofile(path)
    short = LMWindows(path, "uint16", len(tokens), block_size=64, stride=1)
    assert len(short) == 1
    assert short[0]["input_ids"].tolist() == tokens[:-1]
    assert short[0]["labels"].tolist() == tokens[1:]
    seq = LMWindows(path, "uint16", len(tokens), block_size=4, stride=4)
    assert len(seq) == 3
    assert [t for i in range(3) for t in seq[i]["labels"].tolist()] == tokens[1:]
    for ds in (short, seq):
        for i in (-1, len(ds)):
            with pytest.raises(IndexError):
                ds[i]


def test_collate_pads_inputs_with_the_tokenizers_pad_id():
    """pad_id is the padding value of inputs (0 only when the tokenizer has none)."""
    a = supervised_example([5, 6, 7], [8, 9], max_length=16)
    b = supervised_example([5], [8], max_length=16)
    assert collate([a, b], pad_id=3)["input_ids"].tolist() == [[5, 6, 7, 8], [5, 3, 3, 3]]
    assert collate([a, b], pad_id=None)["input_ids"].tolist() == [[5, 6, 7, 8], [5, 0, 0, 0]]


# ----------------------------------------------------------------------------- task builders


def test_data_preparation_without_bars_says_where_each_stage_is(tmp_path, tok, monkeypatch,
                                                                capsys):
    """--no-progress hides the bars, not the log: reading and tokenizing each say how far they
    are, with their counts, at least every console.HEARTBEAT_S seconds (0 here: at each step)."""
    monkeypatch.setattr(console, "HEARTBEAT_S", 0)
    prepare(cfg(tmp_path, task="lm", block_size=64), tok)
    said = [line.split(",")[0] for line in capsys.readouterr().err.splitlines()]
    files = len(stdlib_files(EMAIL))
    assert f"read and clean: {files} files" in said, said
    assert any(re.fullmatch(r"tokenize train: (\d+)/\1 texts", line) for line in said), said


def test_lm_packs_files_with_eos_and_windows_tile_the_split(tmp_path, tok):
    """The lm task joins each split's files, each followed by EOS, into one token
    stream: train windows start at every token, val and test windows cover each token
    once, and val decodes back to its texts."""
    data = prepare(cfg(tmp_path, task="lm", block_size=64), tok)
    corpus = load_corpus(cfg(tmp_path))
    for split in ("train", "val", "test"):
        ds = getattr(data, split)
        expected = [t for text in corpus.texts(split) for t in tok.encode(text) + [tok.eos_id]]
        assert ds.n_tokens == len(expected)
        if split == "train":  # every start position, all windows full length
            assert len(ds) == len(expected) - 64
            for i in (0, 1, 777, len(ds) - 1):
                assert ds[i]["input_ids"].tolist() == expected[i : i + 64]
                assert ds[i]["labels"].tolist() == expected[i + 1 : i + 65]
        else:  # sequential, non-overlapping, covering every token once
            inputs = [t for i in range(len(ds)) for t in ds[i]["input_ids"].tolist()]
            labels = [t for i in range(len(ds)) for t in ds[i]["labels"].tolist()]
            assert inputs == expected[:-1] and labels == expected[1:]
    text = tok.decode(data.val.tokens.tolist())
    assert text == "".join(t + tok.decode([tok.eos_id]) for t in corpus.texts("val"))


def test_window_completion_pairs_are_contiguous_file_tokens(tmp_path, tok):
    """A window completion example is at most 40 prompt tokens then 1 to 12
    completion tokens without EOS, which run on together in one training file: the
    model learns to continue real code."""
    data = prepare(
        cfg(tmp_path, task="completion", window_prompt_tokens=40, window_completion_tokens=12), tok
    )
    corpus = load_corpus(cfg(tmp_path))
    files = [tok.encode(t) for t in corpus.texts("train")]
    assert len(data.train) > 100
    for i in (0, 5, len(data.train) // 2, len(data.train) - 1):
        prompt, completion = prompt_and_completion(data.train[i])
        assert len(prompt) <= 40 and 1 <= len(completion) <= 12 and tok.eos_id not in completion
        seq = prompt + completion
        assert any(_contains(f, seq) for f in files)


def test_default_windows_do_not_overlap_and_a_short_file_still_gives_one():
    """window_stride defaults to prompt + completion tokens ("no overlap"; a stride of the
    prompt alone would overlap), and a file shorter than P + C still gives one pair, its last C
    tokens as completion (windows starting at P would give none). Reference: hand-computed
    positions."""
    c = DataConfig(window_prompt_tokens=4, window_completion_tokens=2)
    ids = list(range(20))
    assert list(window_pairs(ids, c)) == [
        (ids[0:4], ids[4:6]), (ids[6:10], ids[10:12]), (ids[12:16], ids[16:18])]
    short = DataConfig(window_prompt_tokens=100, window_completion_tokens=3)
    assert list(window_pairs(ids[:10], short)) == [(ids[:7], ids[7:10])]


def test_a_window_at_a_files_last_token_completes_that_token():
    """A window may start at a file's last token: its completion is that one token, so the
    file's end is trained, windows of stride C train every token from the P-th on once, and a
    two-token file gives its one pair. Reference: hand-computed positions."""
    ids = list(range(17))
    c = DataConfig(window_prompt_tokens=4, window_completion_tokens=2)
    assert list(window_pairs(ids, c)) == [
        (ids[0:4], ids[4:6]), (ids[6:10], ids[10:12]), (ids[12:16], ids[16:17])]
    tiled = DataConfig(window_prompt_tokens=4, window_completion_tokens=2, window_stride=2)
    assert [t for _, completion in window_pairs(ids, tiled) for t in completion] == ids[4:]
    assert list(window_pairs([7, 8], c)) == [([7], [8])]


def _contains(haystack: list[int], needle: list[int]) -> bool:
    return any(
        haystack[i : i + len(needle)] == needle for i in range(len(haystack) - len(needle) + 1)
    )


def test_line_completion_predicts_the_next_line(tmp_path, tok):
    """Line completion gives lines_per_file examples a file, each a prefix of a file and, as
    completion, the one nonblank line that follows it there, ended by EOS."""
    data = prepare(
        cfg(tmp_path, task="completion", completion_style="line", block_size=128, lines_per_file=3),
        tok,
    )
    texts = email_texts()
    assert len(data.train) == 3 * 22
    for i in range(0, len(data.train), 7):
        prompt, completion = prompt_and_completion(data.train[i])
        assert completion[-1] == tok.eos_id
        prefix, line = tok.decode(prompt), tok.decode(completion[:-1])
        assert line.strip() and "\n" not in line
        assert any((prefix + line + "\n") in t for t in texts.values())


def test_method_task_signature_and_docstring_to_body(tmp_path, tok):
    """A method example's prompt is a function's signature and docstring and its
    completion the rest of the body: together they parse as one whole function
    whose body lies in the completion."""
    data = prepare(cfg(tmp_path, task="method", block_size=512), tok)
    assert len(data.train) > 50
    for i in range(0, len(data.train), 13):
        if len(data.train[i]["input_ids"]) == 512:
            continue  # truncated: the prompt lost its start
        prompt, completion = prompt_and_completion(data.train[i])
        head, body = tok.decode(prompt), tok.decode(completion[:-1])
        fn = ast.parse(head + body).body[0]  # prompt + completion is one whole function
        assert isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
        assert ast.get_docstring(fn) and ('"""' in head or "'''" in head)
        assert fn.body[1].lineno > head.count("\n")  # the body lies in the completion


def test_a_method_prompt_too_long_loses_its_docstring_end_not_its_signature(tmp_path, tok):
    """A prompt cut from the left would train 'docstring fragment -> body', with no name."""
    doc = Doc("nested.py", NESTED_STRINGS)
    [e] = method_examples(doc)  # eval.py's prompts too: one rule
    assert e.head.startswith("def render(") and e.body.lstrip().startswith('"""')
    assert e.prompt == e.head + e.body and e.prompt.rstrip().endswith('"""')
    data = prepare(cfg(tmp_path, task="method", block_size=96), tok)
    assert data.stats["task"]["events"]["train"]["prompt_truncated"] > 20
    for i in range(len(data.train)):
        prompt, _ = prompt_and_completion(data.train[i])
        head = tok.decode(prompt)
        assert head.lstrip().startswith(("def ", "async def ", "@")), head[:80]


def test_docstring_tasks_refuse_a_tokenizer_that_strips_comments(tmp_path, monkeypatch):
    """Its encode turns 'def f():\n    \"\"\"doc\"\"\"' into 'def f():\n    pass'."""
    stripping = CodeTokenizer.train([(EMAIL / "errors.py").read_text("utf-8")],
                                    strip_comments=True)
    monkeypatch.setattr(dataset, "load_corpus", lambda cfg: pytest.fail("built before refusing"))
    for task in ("method", "docstring"):
        with pytest.raises(DataError, match="strip_comments"):
            prepare(cfg(tmp_path, task=task), stripping)


def test_docstring_task_follows_seed_004(tmp_path, tok):
    """The docstring task, with the simple and the verbose prompt, asks for a class's docstring:
    the prompt is the template around the class's code without it (at most
    docstring_code_tokens), the completion the docstring."""
    for style in ("simple", "verbose"):
        data = prepare(
            cfg(
                tmp_path,
                task="docstring",
                docstring_prompt=style,
                block_size=700,
                docstring_code_tokens=100,
            ),
            tok,
        )
        docstrings = {}
        for text in email_texts().values():
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.ClassDef) and ast.get_docstring(node):
                    docstrings[ast.get_docstring(node)] = node.name
        head, tail = DOCSTRING_PROMPTS[style].split("{source_code}")
        assert len(data.train) >= 5
        for i in range(len(data.train)):
            if len(data.train[i]["input_ids"]) == 700:
                continue  # a very long docstring: the prompt lost its start
            prompt, completion = prompt_and_completion(data.train[i])
            target, text = tok.decode(completion[:-1]), tok.decode(prompt)
            assert target in docstrings and len(completion) - 1 >= 20
            assert text.startswith(head.replace("{class_name}", docstrings[target]))
            assert text.endswith(tail) and target not in text
            code = text[len(head.replace("{class_name}", docstrings[target])) : -len(tail)]
            assert code.startswith(("class ", "@")) and len(tok.encode(code)) <= 100 + 1


def test_a_docstring_prompt_of_ones_own_is_a_template(tmp_path, tok):
    """docstring_prompt takes a template of one's own: the class goes where {source_code} is,
    its name where {class_name} is; one without {source_code} is refused naming the forms."""
    template = "Summarize {class_name}:\n{source_code}\n# Docstring:"
    data = prepare(cfg(tmp_path, task="docstring", block_size=700, docstring_prompt=template),
                   tok)
    prompt, _ = prompt_and_completion(data.train[0])
    text = tok.decode(prompt)
    assert re.match(r"Summarize \w+:\n(class |@)", text) and text.endswith("\n# Docstring:"), text
    with pytest.raises(DataError, match=r"docstring_prompt: 'Docstring:' is neither simple nor "
                                        r"verbose nor a template holding \{source_code\}"):
        cfg(tmp_path, task="docstring", docstring_prompt="Docstring:").validate()


def test_a_block_that_cuts_many_prompts_is_noted(tmp_path, tok, capsys):
    """The docstring task's code cut by block_size in a tenth or more of its examples is noted
    with the counts and the remedy; a block that holds them says nothing."""
    prepare(cfg(tmp_path, task="docstring", block_size=64, docstring_code_tokens=400), tok)
    said = capsys.readouterr().err
    assert re.search(r"note: \d+ of \d+ docstring examples .*block_size 64.*--block-size",
                     said), said
    prepare(cfg(tmp_path, task="docstring", block_size=700, docstring_code_tokens=100), tok)
    assert "lost part of their prompt" not in capsys.readouterr().err


def test_show_prints_the_first_examples_as_they_train(tmp_path, tok, capsys):
    """dataset.py --show N prints N training examples decoded on stderr (stdout keeps the JSON
    alone): a docstring example's prompt (the class without its docstring) and its completion,
    the docstring and EOS the loss counts, as the training batches hold them."""
    tok.save(tmp_path / "tok")
    argv = ["--sources", str(EMAIL), "--task", "docstring", "--block-size", "700",
            "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--tokenizer",
            str(tmp_path / "tok")]
    assert dataset.main([*argv, "--show", "2"]) == 0
    out, err = capsys.readouterr()
    json.loads(out)
    data = prepare(cfg(tmp_path, task="docstring", block_size=700), tok)
    for i in range(2):
        prompt, completion = prompt_and_completion(data.train[i])
        assert (f"--- train example {i}: its prompt, {len(prompt)} tokens ---\n"
                f"{tok.decode(prompt)}\n--- its completion, the {len(completion)} tokens the "
                f"loss counts ---\n{tok.decode(completion)}") in err
    assert "train example 2" not in err and tok.decode([tok.eos_id]) in err
    with pytest.raises(SystemExit, match="2"):
        dataset.main([*argv, "--show", "-1"])
    assert "--show -1: give how many examples" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):  # no tokenizer: no examples to show
        dataset.main([*argv[:-2], "--show", "2"])
    assert "--show prints examples a tokenizer built: give --tokenizer" in capsys.readouterr().err


def test_show_prints_lm_windows_that_do_not_overlap(tmp_path, tok, capsys):
    """lm trains windows starting at any token: --show N prints the first N that do not overlap
    (at tokens 0, block_size, ...), each whole, not N windows a token apart."""
    tok.save(tmp_path / "tok")
    assert dataset.main(["--sources", str(EMAIL), "--block-size", "16", "--cache-dir",
                         str(tmp_path / "cache"), "--no-progress", "--tokenizer",
                         str(tmp_path / "tok"), "--show", "2"]) == 0
    err = capsys.readouterr().err
    data = prepare(cfg(tmp_path, block_size=16), tok)
    for start in (0, 16):
        ids = data.train[start]["input_ids"].tolist()
        assert (f"--- train window at token {start}: 16 tokens, every next token counted ---\n"
                f"{tok.decode(ids)}") in err
    assert "window at token 1:" not in err and "window at token 32" not in err


# Strings inside a nested def: one left of the def's indentation, one indented with the code.
NESTED_STRINGS = (
    "class Report:\n"
    "    def render(self):\n"
    '        """Render the report.\n'
    "\n"
    '        Two lines."""\n'
    "        text = '''\\\n"
    "Title\n"
    "  - item one\n"
    "'''\n"
    "        sql = '''\n"
    "            SELECT 1\n"
    "        '''\n"
    "        return text + sql\n"
)


def cleaned_dump(node: ast.AST) -> str:
    """ast.dump with every docstring as ast.get_docstring reads it (cleaned; trailing whitespace,
    which cleaning keeps where no line after the first has text, dropped)."""
    for n in ast.walk(node):
        if not isinstance(n, DOCUMENTED):
            continue
        statement = docstring_statement(n)
        if statement:
            statement.value.value = ast.get_docstring(n).rstrip()
    return ast.dump(node)


def test_docstring_targets_end_in_text_and_prompts_name_the_kind():
    """No target ends in the indentation of its closing quotes (Python < 3.13's cleandoc keeps
    it), and a function target's prompt names a function, not a class."""
    text = ('class Outer:\n    """Summary of a class.\n    """\n\n'
            '    def add(self, a, b):\n        """Add two numbers.\n        """\n'
            '        return a + b\n')
    doc = Doc("m.py", text)
    simple = {e.completion: e.head for e in docstring_examples(doc, "both", "simple", 99)}
    assert simple == {"Summary of a class.": "Class ", "Add two numbers.": "Function "}
    [verbose] = docstring_examples(doc, "function", "verbose", 99)
    assert verbose.head == ("Your task is to write a docstring that summarizes the following "
                            "Python function.\nFunction add:\n")


def test_method_and_docstring_examples_are_the_source_defs():
    """The method task's prompt + target, and the docstring task's code, are the source's def
    (reference: its AST, docstrings read cleaned), also with strings left of the def's indentation
    and with page breaks or U+2028 in the file; the docstring target is ast.get_docstring's, stripped; a
    line completion is the prefix up to a newline and the line after it."""
    texts = {"nested.py": NESTED_STRINGS, "odd.py": ODD_BREAKS, **email_texts()}
    n_methods = n_docstrings = 0
    for name, text in texts.items():
        docstrings = {ast.get_docstring(n).strip() for n in ast.walk(ast.parse(text))
                      if isinstance(n, DOCUMENTED) and ast.get_docstring(n)}
        whole, without = {}, {}  # def name -> dumps of the defs, whole / docstring removed
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, DOCUMENTED):
                whole.setdefault(node.name, set()).add(cleaned_dump(node))
                if docstring_statement(node):
                    body, node.body = node.body, node.body[1:] or [ast.Pass()]
                    without.setdefault(node.name, set()).add(cleaned_dump(node))
                    node.body = body
        doc = Doc(name, text)
        for e in method_examples(doc):
            fn = ast.parse(e.prompt + e.completion).body[0]
            assert cleaned_dump(fn) in whole[fn.name], (name, fn.name)
            n_methods += 1
        for e in docstring_examples(doc, "both", "simple", 400):
            node = ast.parse(e.body).body[0]
            assert cleaned_dump(node) in without[node.name], (name, node.name)
            assert e.completion in docstrings
            n_docstrings += 1
    assert n_methods > 100 and n_docstrings > 100
    [render] = method_examples(Doc("nested.py", NESTED_STRINGS))
    namespace: dict = {}
    exec(render.prompt + render.completion, namespace)
    assert namespace["render"](None) == "Title\n  - item one\n\n            SELECT 1\n        "
    lines = line_completion_examples(Doc("odd.py", ODD_BREAKS), 100, seed=0)
    assert len(lines) == sum(1 for line in ODD_BREAKS.split("\n")[1:] if line.strip())
    for e in lines:
        assert e.head.endswith("\n") and ODD_BREAKS.startswith(e.head + e.completion + "\n")


# Docstrings with a line ending in a backslash: one joins the next line (its indentation is then
# inside the value, mid-line), the other is an escaped backslash.
CONTINUED = (
    "class Counter:\n"
    '    """Counts things."""\n'
    "\n"
    "    def one(self):\n"
    '        """Return one, \\\n'
    '        always."""\n'
    "        return 1\n"
    "\n"
    "    def slash(self):\n"
    '        """Return a backslash: \\\\\n'
    '        one."""\n'
    "        return '\\\\'\n"
)


def test_a_docstring_continued_by_a_backslash_keeps_its_value():
    """The method task's prompt and the docstring task's code hold each docstring exactly as
    the source does, also where a backslash joins one of its lines to the next."""
    doc = Doc("continued.py", CONTINUED)
    source = {n.name: ast.get_docstring(n) for n in ast.walk(ast.parse(CONTINUED))
              if isinstance(n, ast.FunctionDef)}
    assert source["one"] == "Return one,         always."
    examples = {e.head.split("(")[0]: e for e in method_examples(doc)}
    for name, docstring in source.items():
        fn = ast.parse(examples[f"def {name}"].prompt + examples[f"def {name}"].completion).body[0]
        assert ast.get_docstring(fn) == docstring
    assert "\n    one.\"\"\"" in examples["def slash"].prompt  # an escaped backslash joins nothing
    [cls] = docstring_examples(doc, "class", "simple", 400)
    methods = ast.parse(cls.body).body[0].body
    assert {fn.name: ast.get_docstring(fn) for fn in methods} == source


def test_a_prompt_too_long_loses_code_not_its_instruction(tmp_path, tok):
    """Docstring and refactor prompts over block_size or max_prompt_tokens keep their template
    and lose the end of the code inside it (the code is cut to make room)."""
    src = tmp_path / "src"
    src.mkdir()
    methods = "".join(f"    def method_{i}(self, value):\n        return value * {i}\n\n"
                      for i in range(30))
    for i in range(3):
        (src / f"w{i}.py").write_text(
            f"class Widget{i}:\n    \"\"\"Widget {i} transforms values by many numbered "
            "methods, here to show how a long prompt is cut.\"\"\"\n\n" + methods)
    whole = dict(train_frac=1.0, val_frac=0.0, test_frac=0.0)
    for style, limits in (("simple", {}), ("verbose", {}), ("simple", {"max_prompt_tokens": 48})):
        data = prepare(cfg(tmp_path, sources=[str(src)], task="docstring", block_size=160,
                           docstring_prompt=style, docstring_min_tokens=5, **whole, **limits), tok)
        expected = {}
        for p in sorted(src.iterdir()):
            for e in docstring_examples(Doc(p.name, p.read_text()), "class",
                                style, 400):
                parts = [tok.encode(part) for part in (e.head, e.body, e.tail)]
                expected[tuple(tok.encode(e.completion) + [tok.eos_id])] = parts
        assert len(data.train) == len(expected) == 3
        for i in range(len(data.train)):
            prompt, completion = prompt_and_completion(data.train[i])
            head, body, tail = expected[tuple(completion)]
            n_code = len(prompt) - len(head) - len(tail)
            assert 0 < n_code < len(body) and prompt == head + body[:n_code] + tail
            assert len(prompt) == min(161 - len(completion), limits.get("max_prompt_tokens", 161))
    # A refactor prompt is tokenized whole, as eval.py tokenizes it (reference: tok.encode).
    long_input, short_input = methods.replace("    ", "  "), "x  =  1\n"
    records = [{"input": long_input, "output": methods + f"# {i}\n"} for i in range(3)]
    records.append({"input": short_input, "output": "x = 1\n"})
    pairs = write_jsonl(tmp_path / "pairs.jsonl", records)
    data = prepare(cfg(tmp_path, sources=[str(pairs)], task="refactor", block_size=96,
                       max_completion_tokens=40, **whole), tok)
    header = tok.encode(REFACTOR_TEMPLATE.split("{input}")[0])
    whole_prompt = {text: tok.encode(REFACTOR_TEMPLATE.format(input=text))
                    for text in (long_input, short_input)}
    assert len(data.train) == 4
    for i in range(4):
        prompt, completion = prompt_and_completion(data.train[i])
        if len(completion) == 40:  # a long pair: code lost from the end, then the tail "\n"
            reference = whole_prompt[long_input]
            assert prompt[: len(header)] == header and len(prompt) + 40 == 97
            assert prompt == reference[: len(prompt) - 1] + reference[-1:]
        else:
            assert prompt == whole_prompt[short_input]


def test_the_command_takes_trainingmanagers_spelling_of_the_sources(tmp_path, capsys):
    """python dataset.py --data DIR (as trainingmanager.py spells it) prepares what --sources
    DIR prepares: the second finds the first's corpus in the cache."""
    base = ["--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    hits = []
    for flag in ("--sources", "--data"):
        assert dataset.main([flag, str(EMAIL), *base]) == 0
        out, err = capsys.readouterr()
        hits.append(json.loads(out)["cache_hit"])  # stdout: the JSON alone
        assert "the cleaned corpus only" in err and "--tokenizer" in err  # no task without one
    assert hits == [False, True]


def test_the_printed_pair_counts_name_their_sources(tmp_path, capsys):
    """dataset.py's JSON counts the pair records read from each source under that source's name
    (a validation source under its split), not as a list in an order the reader must know."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl",
                        [{"input": f"def f{i}(x):", "output": f"    return x + {i}"}
                         for i in range(3)])
    held = write_jsonl(tmp_path / "held.jsonl", [{"input": "def g(x):", "output": "    return x"}])
    argv = ["--sources", str(EMAIL), str(pairs), "--val-sources", str(held),
            "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    assert dataset.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)["corpus"]["pairs"]
    assert printed == {f"val: {held}": 1, str(EMAIL): 0, str(pairs): 3}


def test_two_folders_of_one_name_are_refused_naming_both(tmp_path):
    """A folder's documents are named by its name: alpha/src and beta/src would give files
    of one name (one repository to the project task), so they are refused, naming both."""
    for project in ("alpha", "beta"):
        (tmp_path / project / "src").mkdir(parents=True)
        (tmp_path / project / "src" / "util.py").write_text(f"def {project}():\n    pass\n")
    sources = [str(tmp_path / "alpha" / "src"), str(tmp_path / "beta" / "src")]
    with pytest.raises(DataError, match=r"alpha/src and .*beta/src are both folders named 'src'"):
        load_corpus(cfg(tmp_path, sources=sources, extensions=[".py"]))


def test_max_completion_tokens_counts_the_completions_own_tokens_not_its_eos(tmp_path, tok):
    """A completion exactly max_completion_tokens long keeps its EOS (the model learns to stop
    there) and is not counted as truncated; one token longer is cut there, without EOS."""
    output = "y = 1\nz = 2\n"
    n = len(tok.encode(output))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"input": "y=1\nz=2\n", "output": output}])
    for limit, eos_kept in ((n, True), (n - 1, False)):
        data = prepare(cfg(tmp_path / str(limit), sources=[str(pairs)], task="refactor",
                           max_completion_tokens=limit, train_frac=1.0, val_frac=0.0,
                           test_frac=0.0), tok)
        _, completion = prompt_and_completion(data.train[0])
        assert (completion[-1] == tok.eos_id) is eos_kept
        assert len(completion) == n + 1 if eos_kept else len(completion) == n - 1
        truncated = data.stats["task"]["events"]["train"].get("completion_truncated", 0)
        assert truncated == (0 if eos_kept else 1)


def test_val_and_test_hold_no_example_identical_to_a_train_example(tmp_path, tok):
    """Different files can hold the same function: its example stays in train only."""
    src = tmp_path / "src"
    src.mkdir()
    shared = 'def shared(x):\n    """Add one."""\n    return x + 1\n'
    for i in range(12):
        (src / f"m{i}.py").write_text(
            f'{shared}\n\ndef own_{i}(x):\n    """Add {i}."""\n    return x + {i}\n')
    data = prepare(cfg(tmp_path, sources=[str(src)], task="method", split_by="file"), tok)

    def examples(split):
        ds = getattr(data, split)
        return [tuple(map(tuple, prompt_and_completion(ds[i]))) for i in range(len(ds))]

    train = set(examples("train"))
    assert len(train) == 10 + 1
    for split in ("val", "test"):
        assert len(examples(split)) == 1 and not set(examples(split)) & train
        assert data.stats["task"]["events"][split] == {"skipped_same_as_train": 1}


def test_refactor_pairs_use_the_seed_000_template(tmp_path, tok):
    """Each refactor record trains as REFACTOR_TEMPLATE around its input with its
    output as the completion, in whichever split it lands: the prompt opens with
    the seed_000 refactor instruction."""
    before = (EMAIL / "encoders.py").read_text("utf-8")
    records = [
        {"input": before, "output": before.replace("    ", "  ")},
        {"input": "def f(x):\n  return x+1", "output": "def f(x):\n    return x + 1"},
    ]
    records += [{"input": f"x{i} = {i}", "output": f"x{i} = {i}  # ok"} for i in range(20)]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", records)
    data = prepare(cfg(tmp_path, task="refactor", sources=[str(pairs)], block_size=4096), tok)
    seen = {}
    for s in ("train", "val", "test"):
        for i in range(len(getattr(data, s))):
            prompt, completion = prompt_and_completion(getattr(data, s)[i])
            seen[tok.decode(prompt)] = tok.decode(completion[:-1])
    assert len(seen) == len(records)
    for r in records:
        assert seen[REFACTOR_TEMPLATE.format(input=r["input"])] == r["output"]
    assert REFACTOR_TEMPLATE.startswith(
        "### Refactor the following Python code to improve quality:\n\n"
    )


def test_fim_examples_rebuild_the_file(tmp_path, tok):
    """A FIM example is its sentinels around prefix and suffix with the middle as the
    completion: prefix + middle + suffix decodes to a stretch of a source file, and at
    fim_rate 0.5 many examples are FIM."""
    data = prepare(cfg(tmp_path, task="fim", block_size=96, fim_rate=0.5), tok)
    n_fim = 0
    texts = list(email_texts().values())
    for i in range(0, len(data.train), 3):
        prompt, completion = prompt_and_completion(data.train[i])
        if prompt[0] != tok.fim_prefix_id:
            continue
        n_fim += 1
        s, m = prompt.index(tok.fim_suffix_id), prompt.index(tok.fim_middle_id)
        prefix, suffix = prompt[1:s], prompt[s + 1 : m]
        assert m == len(prompt) - 1 and completion[-1] == tok.eos_id
        original = tok.decode(prefix + completion[:-1] + suffix)
        assert any(original in t for t in texts)
    assert n_fim > 20


def test_fim_max_completion_tokens_bounds_middles_not_plain_chunks(tmp_path, tok):
    """Cutting a plain LM chunk (no prompt) would drop its tokens from every example."""
    whole = prepare(cfg(tmp_path, task="fim", block_size=64, fim_rate=0.5), tok)
    cut = prepare(cfg(tmp_path, task="fim", block_size=64, fim_rate=0.5,
                      max_completion_tokens=8), tok)
    plain = {True: [], False: []}
    for data, is_cut in ((whole, False), (cut, True)):
        for i in range(len(data.train)):
            prompt, completion = prompt_and_completion(data.train[i])
            if prompt[0] != tok.fim_prefix_id:  # a plain chunk: every token a target
                plain[is_cut].append(data.train[i]["labels"].tolist())
            elif is_cut:  # 8 of its own tokens, then an EOS where it is whole
                assert len(completion) <= 8 or completion[8:] == [tok.eos_id]
    assert len(plain[True]) > 50 and plain[True] == plain[False]
    assert max(map(len, plain[True])) > 8


def test_fim_prompts_cut_to_max_prompt_tokens_keep_their_sentinels(tmp_path, tok):
    """A PSM prompt over max_prompt_tokens loses code far from the middle, never a sentinel."""
    data = prepare(cfg(tmp_path, task="fim", block_size=64, max_prompt_tokens=32, fim_rate=1.0),
                   tok)
    texts = list(email_texts().values())
    sentinels = {tok.fim_prefix_id, tok.fim_suffix_id, tok.fim_middle_id}
    n_fim = 0
    for i in range(len(data.train)):
        prompt, completion = prompt_and_completion(data.train[i])
        assert len(prompt) <= 32
        if prompt[0] != tok.fim_prefix_id:  # a plain chunk (a file's last, too short to cut)
            continue
        n_fim += 1
        assert [t for t in prompt if t in sentinels] == [
            tok.fim_prefix_id, tok.fim_suffix_id, tok.fim_middle_id]
        assert prompt[0] == tok.fim_prefix_id and prompt[-1] == tok.fim_middle_id
        s = prompt.index(tok.fim_suffix_id)
        around_middle = tok.decode(prompt[1:s] + completion[:-1] + prompt[s + 1 : -1])
        assert any(around_middle in t for t in texts)
    assert n_fim > 100
    assert _fit_fim_context([1, 2, 3, 4], [5, 6, 7], 7) == ([3, 4], [5, 6])
    assert _fit_fim_context([1], [5, 6, 7, 8], 7) == ([1], [5, 6, 7])
    with pytest.raises(DataError, match="max_prompt_tokens=2 leaves no room for the 3 sentinels"):
        prepare(cfg(tmp_path, task="fim", max_prompt_tokens=2), tok)


def test_fim_decisions_are_drawn_per_document(tok):
    """fim_rate is a share of the chunks: files of one chunk each get PSM examples at about
    that rate, not all or none (an rng seeded without the document id would draw the same for
    every file). Reference: binomial(200, 0.5), inside [60, 140] with probability 1 - 1e-8."""
    c = DataConfig(task="fim", fim_rate=0.5, block_size=64)
    ids = list(range(10, 30))  # one chunk
    psm = sum(bool(prompt) for i in range(200)
              for prompt, _ in fim_pairs([(ids, f"src/file_{i}.py")], tok, c)[0])
    assert 60 <= psm <= 140


def test_fim_cuts_are_two_distinct_tokens_drawn_uniformly(tok):
    """A PSM chunk of n tokens is cut at two distinct tokens drawn uniformly from 1 to n - 1,
    as the FIM paper draws its two split points (here at tokens, so that no part is empty):
    each of the C(5, 2) = 10 pairs of a 6-token chunk is about a tenth of 2000 files.
    Reference: binomial(2000, 0.1) (mean 200, sd 13.4), inside [120, 280] with probability
    1 - 1e-8 for each pair."""
    c = DataConfig(task="fim", fim_rate=1.0, block_size=64)
    ids = tok.encode("value = first + second")[:6]
    pieces = [tok.decode([i]) for i in ids]
    assert len(ids) == 6 and all(p.isascii() for p in pieces)  # a character a byte
    starts = [0]
    for piece in pieces:
        starts.append(starts[-1] + len(piece))
    byte_lengths = np.fromiter(map(len, tok._id_to_bytes), np.int64)
    cuts = Counter()
    for i in range(2000):
        [(prefix, middle, suffix)] = encoding._fim_plan(ids, f"src/file_{i}.py", len(ids), tok,
                                                        c, byte_lengths)
        assert prefix + middle + suffix == "".join(pieces)
        cuts[starts.index(len(prefix)), starts.index(len(prefix) + len(middle))] += 1
    assert set(cuts) == set(itertools.combinations(range(1, 6), 2))
    assert all(120 <= n <= 280 for n in cuts.values()), cuts


def _hf_trained_on_email(tmp_path_factory, style: str) -> Path:
    """A ``style``-shaped tokenizer.json trained by HF's own BpeTrainer on the email package;
    tests read it (never write it) with HF's Tokenizer and codelm's load_tokenizer."""
    from tiny_hf import train_hf_tokenizer

    path = tmp_path_factory.mktemp(style) / "tokenizer.json"
    train_hf_tokenizer(style, list(email_texts().values()), path)
    return path


@pytest.fixture(scope="module")
def starcoder_json(tmp_path_factory) -> Path:
    return _hf_trained_on_email(tmp_path_factory, "starcoder")


@pytest.fixture(scope="module")
def llama3_json(tmp_path_factory) -> Path:
    return _hf_trained_on_email(tmp_path_factory, "llama3")


@pytest.fixture(scope="module")
def starcoder_tok(starcoder_json):
    """A StarCoder-shaped tokenizer.json trained by HF on the email package: (HF's Tokenizer,
    reading special-token text as text as dataset.py does, and codelm's load of the file)."""
    from tokenizers import Tokenizer

    from tokenizer import load_tokenizer

    hf = Tokenizer.from_file(str(starcoder_json))
    hf.encode_special_tokens = True
    return hf, load_tokenizer(starcoder_json)


def check_fim_pairs_against_hf(hf, tok, text: str, doc_id: str, block_size: int,
                               fim_rate: float = 1.0) -> Counter:
    """Checks fim_pairs of one file against HF: chunks of block_size + 1 - 4 of HF's
    ids of the whole file; a plain chunk is those ids; a PSM chunk's text (from HF's character
    offsets, so a cut inside a character takes all of it) is prefix + middle + suffix, each of
    them HF's encoding of its text alone, the prompt cut by ids only so that the example fits
    block_size; a plain chunk after a file's first opens with the token before it. Returns
    counts of the kinds of chunk seen."""
    c = DataConfig(task="fim", fim_rate=fim_rate, block_size=block_size)
    pre, suf, mid = (hf.token_to_id(t) for t in ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"))
    enc = hf.encode(text, add_special_tokens=False)
    ids, starts = enc.ids, [o[0] for o in enc.offsets] + [len(text)]
    size = block_size + 1 - 4
    chunks = [s for s in range(0, len(ids), size) if len(ids[max(0, s - 1) : s + size]) >= 2]
    pairs = fim_pairs([(ids, doc_id)], tok, c)[0]
    assert len(pairs) == len(chunks)
    seen = Counter()
    for s, (prompt, middle) in zip(chunks, pairs):
        chunk = ids[s : s + size]
        if not prompt:
            assert middle == ids[max(0, s - 1) : s + size]
            seen["plain"] += 1
            continue
        assert prompt[0] == pre and prompt[-1] == mid and prompt.count(suf) == 1
        k = prompt.index(suf)
        prefix, suffix = prompt[1:k], prompt[k + 1 : -1]
        assert len(prompt) + len(middle) <= block_size  # + EOS: block_size + 1 tokens
        chunk_text = text[starts[s] : starts[s + len(chunk)]]
        middle_text = hf.decode(middle)
        assert "\ufffd" not in middle_text
        assert hf.encode(middle_text, add_special_tokens=False).ids == middle
        cuts = []  # where the middle can start: its prefix and suffix texts give the ids seen
        for x in range(len(chunk_text) + 1):
            if not chunk_text.startswith(middle_text, x):
                continue
            whole_prefix = hf.encode(chunk_text[:x], add_special_tokens=False).ids
            whole_suffix = hf.encode(chunk_text[x + len(middle_text) :],
                                     add_special_tokens=False).ids
            if (whole_prefix[len(whole_prefix) - len(prefix) :] == prefix
                    and whole_suffix[: len(suffix)] == suffix):
                cuts.append(len(whole_prefix) + len(whole_suffix) - len(prefix) - len(suffix))
        assert cuts, (doc_id, s)
        # Ids are cut from the prompt only where the parts overflow the chunk's room.
        kept = len(prefix) + len(middle) + len(suffix)
        assert min(cuts) == 0 or kept == size, (doc_id, s, cuts)
        seen["psm_cut_to_fit" if min(cuts) else "psm"] += 1
    return seen


def test_fim_parts_are_each_encoded_alone_as_starcoder_cuts_them(starcoder_tok):
    """A PSM example's prefix, middle and suffix are the ids HF's tokenizer gives each part's
    text alone, as bigcode's StarCoder pipeline builds them and as a user's parts are tokenized
    at inference, not a cut among the file's ids, which can fall inside a whitespace run or a
    word split over two tokens. Reference: HF tokenizers' encodings of the parts and its character offsets."""
    hf, tok = starcoder_tok
    seen = Counter()
    for name, text in email_texts().items():
        seen += check_fim_pairs_against_hf(hf, tok, text, name, block_size=64, fim_rate=0.5)
    assert seen["psm"] > 600 and seen["plain"] > 600


def test_fim_cuts_inside_multibyte_characters_keep_the_text_whole(starcoder_tok):
    """Byte-level tokens hold parts of a multi-byte character (this vocabulary, trained on ASCII
    code, spells each non-ASCII character in bytes): a cut there keeps the character whole,
    never U+FFFD in the parts. Short chunks put many cuts there."""
    hf, tok = starcoder_tok
    text = "".join(f'def größe_{i}(maß="naïve café {i}", 名前="日本語 😀 Ωμέγα"):\n'
                   f'    return maß * {i}  # «{i}» ≠ ∞\n' for i in range(40))
    seen = Counter()
    for i in range(4):
        seen += check_fim_pairs_against_hf(hf, tok, text, f"unicode_{i}.py", block_size=12)
    assert seen["psm"] > 400 and seen["psm_cut_to_fit"] > 10


def test_a_docstring_prompts_code_cut_inside_a_character_drops_that_character(starcoder_tok):
    """The code of a docstring prompt cut to docstring_code_tokens can end inside a character
    this vocabulary spells in bytes: the cut drops the character, never writing U+FFFD, which
    the source does not hold, in training's prompt and eval.py's alike. Reference: HF's decode
    of the most of the first budget ids that decode whole, and HF's encoding of that prompt."""
    hf, tok = starcoder_tok
    src = ('class Größe:\n    """Holds the size of a thing."""\n\n    def maß(self):\n'
           '        return "日本語のテキスト"\n')
    [whole] = docstring_examples(Doc("a.py", src), "class", "simple", 10**6)
    ids = hf.encode(whole.body, add_special_tokens=False).ids
    c = DataConfig(task="docstring", block_size=4096, progress=False)
    for budget in range(1, len(ids)):
        [example] = docstring_examples(Doc("a.py", src), "class", "simple", budget)
        kept = max(k for k in range(budget + 1) if "\ufffd" not in hf.decode(ids[:k]))
        expected = whole.head + hf.decode(ids[:kept]) + whole.tail
        assert fitted_prompt(example, tok) == expected
        [(prompt, _, _)] = tokenize_examples([example], tok, c, "docstring")
        assert prompt == hf.encode(expected, add_special_tokens=False).ids


def test_built_fim_middles_are_each_encoded_alone(tmp_path, starcoder_tok):
    """prepare's fim examples (encoded in one batch for all files) have middles that are HF's
    encoding of their text, followed by EOS, within block_size. With fim_rate=1 the only plain
    LM chunks are a file's last 2 tokens (no two cut points fit): one target, no EOS."""
    hf, tok = starcoder_tok
    data = prepare(cfg(tmp_path, task="fim", block_size=48, fim_rate=1.0), tok)
    n = 0
    for i in range(len(data.train)):
        prompt, completion = prompt_and_completion(data.train[i])
        assert len(prompt) + len(completion) <= 49
        if data.train[i]["labels"][0] != -100:  # a plain chunk: every token is a target
            assert len(prompt) == len(completion) == 1 and tok.eos_id not in completion
        else:
            assert prompt[0] == tok.fim_prefix_id
            middle = completion[:-1]
            assert completion[-1] == tok.eos_id
            assert hf.encode(hf.decode(middle), add_special_tokens=False).ids == middle
            n += 1
    assert n > 1000


def test_line_completion_targets_are_drawn_per_document():
    """The sampled lines depend on the document, not on the seed alone, as fim's draws do: files
    of one length do not all get the same line numbers. Reference: 30 independent draws of
    one line among 49 agree with probability 49**-29."""
    text = "".join(f"x{i} = {i}\n" for i in range(50))
    chosen = {e.head.count("\n") for i in range(30)
              for e in line_completion_examples(Doc(f"m{i}.py", text), 1, seed=0)}
    assert len(chosen) > 1


def test_a_docstring_sharing_its_line_with_code_makes_no_docstring_example():
    """Removing such a docstring would remove the code after it on its line (``x = 1`` below),
    so the class's code in the prompt would not be the source's: no example."""
    text = ('class A:\n    """Holds x."""; x = 1\n\n    def get(self):\n'
            '        """Return x."""\n        return self.x\n')
    examples = docstring_examples(Doc("a.py", text), "both", "simple", 400)
    assert [e.completion for e in examples] == ["Return x."]


def test_fim_plain_chunks_get_no_eos_in_the_built_data(tmp_path, tok):
    """fim_rate=0: every chunk is a plain LM chunk, its tokens as the file has them with no EOS
    added (it is no completion that ends the text), chunks of block_size + 1 - 4 tokens, each
    after the first opening with the token before it: every token after the file's first is a
    target once, as in lm windows. Reference: slices of tok.encode of the file."""
    src = tmp_path / "src"
    src.mkdir()
    text = (EMAIL / "quoprimime.py").read_text("utf-8")
    (src / "q.py").write_text(text)
    data = prepare(cfg(tmp_path, sources=[str(src)], task="fim", fim_rate=0.0, block_size=32,
                       min_lines=1, strip_license=False, **WHOLE), tok)
    ids = tok.encode(text)
    chunks = [ids[max(0, s - 1) : s + 29] for s in range(0, len(ids), 29)]
    expected = [(ch[:-1], ch[1:]) for ch in chunks if len(ch) >= 2]
    got = [(data.train[i]["input_ids"].tolist(), data.train[i]["labels"].tolist())
           for i in range(len(data.train))]
    assert got == expected
    assert [t for _, labels in got for t in labels] == ids[1:]


def test_fim_and_window_tasks_read_a_conversation_as_its_text(tmp_path, tok):
    """A conversation record in a task that cuts files into chunks or windows (fim, window
    completion) is read as the lm task reads it, its messages' text one after another, never
    the JSON that holds it ("role" keys, escaped newlines). Reference: the plain chunks and the
    windows of tok.encode of that text."""
    messages = [{"role": "user", "content": "Write a function that adds one to x."},
                {"role": "assistant", "content": "def add_one(x):\n    return x + 1\n"}]
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": messages}])
    ids = tok.encode("\n".join(m["content"] for m in messages))
    fim = prepare(cfg(tmp_path, sources=[str(chats)], task="fim", fim_rate=0.0, block_size=8,
                      **WHOLE), tok)
    assert [t for i in range(len(fim.train)) for t in fim.train[i]["labels"].tolist()] == ids[1:]
    windows = cfg(tmp_path, sources=[str(chats)], task="completion", block_size=16,
                  window_prompt_tokens=4, window_completion_tokens=3, **WHOLE)
    built = prepare(windows, tok).train
    got = [built[i]["input_ids"].tolist() + built[i]["labels"].tolist()[-1:]
           for i in range(len(built))]
    assert got == [prompt + completion for prompt, completion in window_pairs(ids, windows)]
    # eval.py's completion task scores those windows
    from codelm.evaluation.config import EvalConfig
    from codelm.evaluation.tasks.text import completion_examples

    doc = Doc("chats.jsonl:1", json.dumps(messages), chat=True)
    scored = completion_examples(doc, tok, windows, EvalConfig(lines_per_file=99, progress=False))
    assert [(e.head, e.completion) for e in scored] == [
        (tok.decode(prompt), tok.decode(completion))
        for prompt, completion in window_pairs(ids, windows)]


def test_add_eos_false_leaves_completions_without_eos(tmp_path, tok):
    """add_eos=False: each supervised completion is its tokens alone. Reference: tok.encode."""
    records = [{"input": f"x{i}  =  {i}\n", "output": f"x{i} = {i}\n"} for i in range(4)]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", records)
    for add_eos in (True, False):
        data = prepare(cfg(tmp_path, sources=[str(pairs)], task="refactor", add_eos=add_eos,
                           **WHOLE), tok)
        completions = sorted(prompt_and_completion(data.train[i])[1]
                             for i in range(len(data.train)))
        eos = [tok.eos_id] if add_eos else []
        assert completions == sorted(tok.encode(r["output"]) + eos for r in records)


def test_a_completion_of_long_tokens_that_fits_the_block_is_kept_whole(tmp_path):
    """A completion of 5,000 characters in about 110 tokens (banner lines each a token of 100
    characters) fits a block of 128 with its prompt: it is trained whole, its EOS after it
    (text is cut before tokenizing only past what the tokenizer's longest token allows)."""
    banner = "=" * 100 + "\n"
    prompt, completion = "def show():\n", "print('a')\n" + banner * 50 + "print('b')\n"
    long_tok = CodeTokenizer.train([prompt + completion] * 5 + ["x = 1\n"] * 5, min_freq=2)
    assert long_tok.longest_token >= 100 and len(long_tok.encode(completion)) < 120
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"# {i}\n{prompt}",
                                                    "completion": completion} for i in range(3)])
    data = prepare(cfg(tmp_path, sources=[str(pairs)], task="completion", block_size=128,
                       **WHOLE), long_tok)
    assert prompt_and_completion(data.train[0])[1] == (long_tok.encode(completion)
                                                       + [long_tok.eos_id])


def test_docstring_min_tokens_keeps_a_docstring_of_exactly_that_many_tokens(tmp_path, tok):
    """"shorter docstrings make no example": one of exactly docstring_min_tokens is kept; with
    none kept, the refusal says so and names the options."""
    src = tmp_path / "src"
    src.mkdir()
    docstring = "Parse a header value into its parts and return them as a list."
    (src / "m.py").write_text(f'class Parser:\n    """{docstring}"""\n\n'
                              "    def parse(self, value):\n        return value.split()\n")
    n = len(tok.encode(docstring))
    options = dict(sources=[str(src)], task="docstring", **WHOLE)
    data = prepare(cfg(tmp_path, docstring_min_tokens=n, **options), tok)
    assert len(data.train) == 1
    assert prompt_and_completion(data.train[0])[1] == tok.encode(docstring) + [tok.eos_id]
    with pytest.raises(DataError) as refused:  # says why, and which option lets it in
        prepare(cfg(tmp_path, docstring_min_tokens=n + 1, **options), tok)
    assert all(w in str(refused.value) for w in (
        "built no training examples", "1 docstring(s) (docstring_targets class)",
        f"shorter than docstring_min_tokens, {n + 1}", "--docstring-min-tokens N",
        '"docstring_min_tokens": N', "docstring_targets both takes functions' too"))
    with pytest.raises(DataError) as refused:  # both targets already: no other to suggest
        prepare(cfg(tmp_path, docstring_min_tokens=n + 1, docstring_targets="both", **options),
                tok)
    assert "(docstring_targets both)" in str(refused.value)
    assert "takes" not in str(refused.value)


def test_method_task_reads_targets_from_python_files_only(tmp_path, tok):
    """A Kotlin file in a mixed corpus gives no method example and is no Python syntax error
    (the count that flags broken Python files)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "m.py").write_text('def add(a, b):\n    """Add them."""\n    return a + b\n')
    (src / "Add.kt").write_text("fun add(a: Int, b: Int): Int {\n    return a + b\n}\n")
    data = prepare(cfg(tmp_path, sources=[str(src)], extensions=[".py", ".kt"], task="method",
                       **WHOLE), tok)
    assert len(data.train) == 1
    assert "skipped_syntax_error_file" not in data.stats["task"]["events"].get("train", {})
    (src / "m.py").unlink()  # Kotlin alone: the error names the cause and the tasks that fit
    with pytest.raises(DataError, match=r"method targets come from Python files .* --task lm"):
        prepare(cfg(tmp_path, sources=[str(src)], extensions=[".kt"], task="method", **WHOLE),
                tok)


def test_pretrained_bpe_tokenizer_ids_match_hf_tokenizers(tmp_path, starcoder_json):
    """A StarCoder-shaped tokenizer.json (trained by HF): packed lm tokens and FIM ids are HF's."""
    from tokenizers import Tokenizer

    from tokenizer import load_tokenizer

    hf = Tokenizer.from_file(str(starcoder_json))
    tok = load_tokenizer(starcoder_json)
    assert tok.eos_id == hf.token_to_id("<|endoftext|>")

    data = prepare(cfg(tmp_path, task="lm", block_size=64), tok)
    corpus = load_corpus(cfg(tmp_path))
    eos = hf.token_to_id("<|endoftext|>")
    reference = [t for text in corpus.texts("val")
                 for t in hf.encode(text, add_special_tokens=False).ids + [eos]]
    assert data.val.tokens.tolist() == reference

    fim = prepare(cfg(tmp_path, task="fim", block_size=64, fim_rate=1.0), tok)
    prompt, completion = prompt_and_completion(fim.train[0])
    assert prompt[0] == hf.token_to_id("<fim_prefix>")
    assert prompt[-1] == hf.token_to_id("<fim_middle>")
    assert hf.token_to_id("<fim_suffix>") in prompt and completion[-1] == eos


def test_llama3_text_starts_with_its_bos_as_transformers_encodes_it(tmp_path, llama3_json):
    """Llama-3's tokenizer.json template puts <|begin_of_text|> before every text, so
    transformers' tokenizer(text) (what the model was pretrained on, and what HF fine-tuning
    feeds it) starts with it. Each packed file and each supervised example starts so too, also
    when its prompt is cut, and prompt_prefix (eval.py's prompts) agrees."""
    from transformers import PreTrainedTokenizerFast

    from tokenizer import load_tokenizer

    tok = load_tokenizer(llama3_json)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(llama3_json))
    bos, eos = hf.convert_tokens_to_ids(["<|begin_of_text|>", "<|end_of_text|>"])
    assert tok.template_prefix == [bos] and tok.eos_id == eos
    assert prompt_prefix(tok, "lm") == [eos, bos]
    assert prompt_prefix(tok, "completion") == prompt_prefix(tok, None) == [bos]

    data = prepare(cfg(tmp_path, task="lm", block_size=64), tok)
    corpus = load_corpus(cfg(tmp_path))
    reference = [t for text in corpus.texts("val") for t in hf(text)["input_ids"] + [eos]]
    assert reference[0] == bos and data.val.tokens.tolist() == reference

    records = [{"prompt": f"def scale_{i}(x):\n    # times {i}\n", "completion": f"    return x * {i}\n"}
               for i in range(6)]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", records)
    sft = prepare(cfg(tmp_path, sources=[str(pairs)], task="completion", block_size=64, **WHOLE),
                  tok)
    built = sorted(prompt_and_completion(sft.train[i]) for i in range(len(sft.train)))
    want = sorted((hf(r["prompt"])["input_ids"],
                   hf(r["completion"], add_special_tokens=False)["input_ids"] + [eos])
                  for r in records)
    assert built == want
    cut = prepare(cfg(tmp_path, sources=[str(pairs)], task="completion", block_size=8, **WHOLE),
                  tok)
    for i in range(len(cut.train)):
        prompt, completion = prompt_and_completion(cut.train[i])
        assert prompt[0] == bos and bos not in prompt[1:] + completion
        assert len(prompt) + len(completion) == 9  # the context (8 inputs) filled, BOS included


def test_special_token_text_in_a_document_is_text(tmp_path, starcoder_json):
    """A BPE tokenizer reads ``<|endoftext|>`` quoted in scraped code as text, not as EOS (a
    false document end), and ``<fim_middle>`` not as a sentinel; special ids go in by id only."""
    from tokenizers import Tokenizer

    from tokenizer import load_tokenizer

    texts = email_texts()
    hf = Tokenizer.from_file(str(starcoder_json))
    tok = load_tokenizer(starcoder_json)
    src = tmp_path / "src"
    src.mkdir()
    for name, text in list(texts.items())[:8]:
        (src / Path(name).name).write_text(
            text + '\nEOS, FIM = "<|endoftext|>", "<fim_prefix>{p}<fim_suffix>{s}<fim_middle>"\n')
    options = dict(sources=[str(src)], block_size=64)
    data = prepare(cfg(tmp_path, task="lm", **options), tok)
    corpus = load_corpus(cfg(tmp_path, **options))
    hf.encode_special_tokens = True
    reference = [t for text in corpus.texts("train")
                 for t in hf.encode(text, add_special_tokens=False).ids + [tok.eos_id]]
    assert data.train.tokens.tolist() == reference
    assert reference.count(tok.eos_id) == len(corpus.texts("train"))
    fim = prepare(cfg(tmp_path, task="fim", fim_rate=1.0, **options), tok)
    sentinels = {tok.fim_prefix_id, tok.fim_suffix_id, tok.fim_middle_id}
    for i in range(len(fim.train)):
        prompt, completion = prompt_and_completion(fim.train[i])
        assert sum(t in sentinels for t in prompt + completion) in (0, 3)


def test_chat_formatted_pairs_are_encoded_as_text_and_a_note_says_so(tmp_path, capsys,
                                                                     llama3_json):
    """A pair record written with Llama-3-Instruct's chat template holds <|eot_id|> as text:
    transformers' tokenizer(prompt) makes it the special id, dataset.py keeps it text (its rule
    for every record), so the model would never see its chat format; a note says so, on a cache
    hit too, and plain records get none."""
    from tokenizers import Tokenizer

    from tokenizer import load_tokenizer

    hf = Tokenizer.from_file(str(llama3_json))
    tok = load_tokenizer(llama3_json)
    eot = hf.token_to_id("<|eot_id|>")
    chat = [{"prompt": f"<|begin_of_text|>user\n\nscale by {i}<|eot_id|>assistant\n\n",
             "completion": f"return x * {i}"} for i in range(4)]
    plain = [{"prompt": f"def scale_{i}(x):\n", "completion": f"    return x * {i}\n"}
             for i in range(4)]
    note = "note: 4 input/output pair(s) hold the text of a special token of the tokenizer"
    for records, noted in ((chat, True), (plain, False)):
        pairs = write_jsonl(tmp_path / f"{noted}.jsonl", records)
        for _ in range(2):  # built, then read from the cache
            data = prepare(cfg(tmp_path, sources=[str(pairs)], task="completion", **WHOLE), tok)
            assert (note in capsys.readouterr().err) == noted
    assert eot in hf.encode(chat[0]["prompt"]).ids
    data = prepare(cfg(tmp_path, sources=[str(tmp_path / "True.jsonl")], task="completion",
                   **WHOLE), tok)
    assert all(eot not in prompt_and_completion(data.train[i])[0] for i in range(len(data.train)))


def _instruct_tokenizers(tmp_path):
    """A Llama-3-Instruct-shaped tokenizer directory (tokenizer.json, and tokenizer_config.json
    with bos <|begin_of_text|>, eos <|eot_id|>, a chat template) read by codelm and by
    transformers' AutoTokenizer (the reference)."""
    import transformers
    from tiny_hf import LLAMA3_CHAT_TEMPLATE, train_hf_tokenizer

    from tokenizer import load_tokenizer

    path = tmp_path / "instruct"
    path.mkdir()
    train_hf_tokenizer("llama3", list(email_texts().values()), path / "tokenizer.json")
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
         "chat_template": LLAMA3_CHAT_TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast"}))
    return load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(path)


def _example_ids(data) -> list[list[int]]:
    """Every train example's whole id sequence (prompt, completion, EOS)."""
    out = []
    for i in range(len(data.train)):
        example = data.train[i]
        out.append(example["input_ids"].tolist() + example["labels"].tolist()[-1:])
    return out


def test_pair_special_tokens_encodes_chat_records_as_transformers_tokenizer_does(tmp_path,
                                                                                capsys):
    """The SFT recipe's records (prompt: apply_chat_template(..., tokenize=False), completion:
    answer + <|eot_id|>) train on the special ids with pair_special_tokens, as transformers'
    tokenizer(prompt) + tokenizer(completion) + eos, the eos not doubled after a completion
    that ends with it (TRL's SFT adds none then): a prompt holding the template's
    <|begin_of_text|> gets no second BOS, one without gets the BOS. Without the option the
    records are encoded as any record is (special-token text as text, the BOS placed once); the two
    builds are different cache entries, and only the one without the option notes the text."""
    tok, hf = _instruct_tokenizers(tmp_path)
    records = [{"prompt": hf.apply_chat_template([{"role": "user", "content": f"scale by {i}"}],
                                                 tokenize=False),
                "completion": f"return x * {i}<|eot_id|>"} for i in range(3)]
    assert all(r["prompt"].startswith("<|begin_of_text|>") for r in records)
    records += [{"input": "no template<|eot_id|>here", "output": "ok<|end_of_text|>"}]
    pairs = write_jsonl(tmp_path / "chat.jsonl", records)
    options = dict(sources=[str(pairs)], task="completion", **WHOLE)

    def reference(prompt: str, completion: str, **kw) -> list[int]:
        bos = not prompt.startswith(hf.bos_token) and not kw
        ids = (hf(prompt, add_special_tokens=bos, **kw)["input_ids"]
               + hf(completion, add_special_tokens=False, **kw)["input_ids"])
        # EOS ends it, once: as TRL's SFT, none after a completion that ends with it
        return ids if ids[-1] == hf.eos_token_id else ids + [hf.eos_token_id]

    texts = [(r.get("prompt", r.get("input")), r.get("completion", r.get("output")))
             for r in records]
    on = prepare(cfg(tmp_path, pair_special_tokens=True, **options), tok)
    assert "hold the text of a special token" not in capsys.readouterr().err
    expected = [reference(p, c) for p, c in texts]
    assert sorted(_example_ids(on)) == sorted(expected)
    assert all(ids.count(hf.bos_token_id) == 1 for ids in expected)
    assert all(hf.convert_tokens_to_ids("<|eot_id|>") in ids[:-1] for ids in expected)

    off = prepare(cfg(tmp_path, **options), tok)
    note = capsys.readouterr().err
    assert "4 input/output pair(s) hold the text of a special token" in note
    assert "--pair-special-tokens" in note and '{"pair_special_tokens": true}' in note
    as_text = [[hf.bos_token_id] + reference(p, c, split_special_tokens=True) for p, c in texts]
    assert sorted(_example_ids(off)) == sorted(as_text)
    assert off.cache_path != on.cache_path
    again = prepare(cfg(tmp_path, pair_special_tokens=True, **options), tok)
    assert again.stats["cache_hit"] and again.cache_path == on.cache_path
    argv = ["--tokenizer", str(tmp_path / "instruct"), "--sources", str(pairs), "--task",
            "completion", "--train-frac", "1", "--val-frac", "0", "--test-frac", "0",
            "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    for flag, entry in (("--pair-special-tokens", on), ("--no-pair-special-tokens", off)):
        assert dataset.main([*argv, flag]) == 0
        assert f"cached at {entry.cache_path}" in capsys.readouterr().err


def test_pair_special_tokens_leaves_documents_text_and_lm_keys_alone(tmp_path):
    """The option is for pair records: a scraped document quoting <|eot_id|> still holds no
    special id in its windows, and the lm task (pairs packed as text) keeps its cache key."""
    tok, hf = _instruct_tokenizers(tmp_path)
    code = "\n".join(f"END_{i} = '<|eot_id|>'  # a literal, not an end" for i in range(30))
    source = write_jsonl(tmp_path / "mixed.jsonl", [
        {"repo": "r", "path": "end.py", "text": code},
        {"prompt": "<|begin_of_text|>q<|eot_id|>", "completion": "a<|eot_id|>"}])
    data = prepare(cfg(tmp_path, sources=[str(source)], task="completion", window_prompt_tokens=8,
                       window_completion_tokens=8, pair_special_tokens=True, **WHOLE), tok)
    eot = hf.convert_tokens_to_ids("<|eot_id|>")
    examples = _example_ids(data)
    with_eot = [ids for ids in examples if eot in ids[:-1]]
    assert len(examples) > 2 and len(with_eot) == 1  # the pair's only
    assert with_eot[0] == (hf("<|begin_of_text|>q<|eot_id|>", add_special_tokens=False)[
        "input_ids"] + hf("a<|eot_id|>", add_special_tokens=False)["input_ids"])  # one EOS
    lm = cfg(tmp_path, sources=[str(source)], task="lm")
    assert dataset._task_options(lm) == dataset._task_options(
        dataclasses.replace(lm, pair_special_tokens=True))


def test_user_prompts_read_special_token_text_as_their_model_learned_it(tmp_path, capsys):
    """A user's prompt (eval.py --prompt, a pass@k problem, a run's sample prompt) holding a chat
    template's text: a base checkpoint reads it as transformers' tokenizer(text) does (a second
    BOS included); a pair_special_tokens run as tokenize_examples read its pairs (one BOS); a
    run without the option keeps it text, as its data, with one note naming the tokens."""
    tok, hf = _instruct_tokenizers(tmp_path)
    chat = hf.apply_chat_template([{"role": "user", "content": "scale by 2"}], tokenize=False)
    code = "def f(x):\n    return x\n"
    prompts = [chat, "no template<|eot_id|>here", code]
    start = prompt_prefix(tok, None)
    assert start == [hf.bos_token_id] and chat.startswith(hf.bos_token)

    base = [start + ids for ids in encode_prompts(tok, prompts)]
    assert base == [hf(p)["input_ids"] for p in prompts]
    assert base[0][:2] == [hf.bos_token_id] * 2  # transformers gives two

    read = encode_prompts(tok, prompts, True)
    assert [start + ids for ids in read] == [
        hf(p, add_special_tokens=not p.startswith(hf.bos_token))["input_ids"] for p in prompts]
    pairs = [Example(p, "x", pair=True) for p in prompts]
    trained = tokenize_examples(
        pairs, tok, cfg(tmp_path, task="refactor", pair_special_tokens=True), "tokenize")
    assert read == [ids for ids, _, _ in trained]
    assert capsys.readouterr().err == ""

    text = encode_prompts(tok, prompts, False, " (REMEDY)")
    assert [start + ids for ids in text] == [
        hf(p, split_special_tokens=True)["input_ids"] for p in prompts]
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and err.endswith(" (REMEDY)\n")
    assert "2 prompt(s)" in err and "special token(s)" in err
    assert "(<|begin_of_text|>, <|eot_id|>)" in err
    assert encode_prompts(tok, [code], False) == [text[2]]
    assert capsys.readouterr().err == ""


def test_the_prompts_note_counts_a_repeated_prompt_once(tmp_path, capsys):
    """eval's pass@k encodes each problem once per sample: the note counts a problem with
    special-token text once, not as num_samples prompts. The first prompt holds none: every
    prompt counts."""
    tok, _ = _instruct_tokenizers(tmp_path)
    prompts = ["def f(x):\n"] + ["a<|eot_id|>"] * 20 + ["b<|eot_id|>"]
    encode_prompts(tok, prompts, False)
    err = capsys.readouterr().err
    assert "note: 2 prompt(s)" in err and "special token(s)" in err and "(<|eot_id|>)" in err, err


def test_a_pair_prompts_read_bos_moves_its_body_span_with_it(tmp_path):
    """A refactor pair whose head starts with the template's <|begin_of_text|> text loses that
    BOS under pair_special_tokens: the body's span (what a too-long prompt cuts) moves back by
    it, to the ids transformers gives the head and body."""
    tok, hf = _instruct_tokenizers(tmp_path)
    head = hf.apply_chat_template([{"role": "user", "content": "refactor:"}],
                                  tokenize=False)[: -len("<|eot_id|>")] + "\n"
    body, tail = "def f(x):\n    return x\n", "<|eot_id|>"
    assert head.startswith(hf.bos_token)
    [(ids, _, (start, end))] = tokenize_examples(
        [Example(head, "y", body, tail, pair=True)], tok,
        cfg(tmp_path, task="refactor", pair_special_tokens=True), "tokenize")
    head_ids = hf(head, add_special_tokens=False)["input_ids"][1:]  # less its BOS
    body_ids = hf(body, add_special_tokens=False)["input_ids"]
    assert ids[:start] == head_ids and ids[start:end] == body_ids
    assert (start, end) == (len(head_ids), len(head_ids) + len(body_ids))


def test_a_prompt_loses_a_two_token_template_prefix_only_whole(tmp_path):
    """A tokenizer whose template puts two tokens before each text: a pair_special_tokens prompt
    (a user's, a pair record's) drops them only when it starts with both, as transformers'
    tokenizer(text) reads it with the template's tokens placed once."""
    import transformers
    from tokenizers import Tokenizer, processors

    from tokenizer import load_tokenizer

    _instruct_tokenizers(tmp_path)
    path = tmp_path / "instruct"
    hf_tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    pair = ["<|begin_of_text|>", "<|end_of_text|>"]
    hf_tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{pair[0]} {pair[1]} $A",
                                      special_tokens=[(t, hf_tok.token_to_id(t)) for t in pair])])
    hf_tok.save(str(path / "tokenizer.json"))
    tok, hf = load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(path)
    start = prompt_prefix(tok, None)
    assert start == tok.template_prefix == hf.convert_tokens_to_ids(pair)
    prompts = [pair[0] + "x = 1", "".join(pair) + "x = 1", pair[1] + "x", "x = 1"]
    read = encode_prompts(tok, prompts, True)
    assert [start + ids for ids in read] == [
        hf(p, add_special_tokens=not p.startswith("".join(pair)))["input_ids"] for p in prompts]
    trained = tokenize_examples([Example(p, "x", pair=True) for p in prompts],
                        tok, cfg(tmp_path, task="refactor",
                                 pair_special_tokens=True), "tokenize")
    assert [ids for ids, _, _ in trained] == read


# ----------------------------------------------------------------------------- errors, cache


@pytest.mark.parametrize("workers", [1, 2])
def test_malformed_jsonl_names_file_and_line(tmp_path, workers):
    """Also when the reader feeds a cleaning pool (its error crosses the pool's threads)."""
    bad = write_jsonl(
        tmp_path / "data.jsonl",
        [{"input": "a = 1", "output": "a = 2"}, {"input": "b", "output": "c"}, '{"input": oops'],
    )
    with pytest.raises(DataError, match=r"data\.jsonl:3: malformed JSON at column 11: "
                                        r"Expecting value"):
        load_corpus(cfg(tmp_path, sources=[str(bad)], num_workers=workers))
    wrong = write_jsonl(tmp_path / "keys.jsonl", [{"code": "x"}])
    with pytest.raises(DataError, match=r"keys\.jsonl:1: record has none of the keys.*"
                                        r"""--data-options '\{"text_column": "content"\}'"""):
        load_corpus(cfg(tmp_path, sources=[str(wrong)], num_workers=workers))
    wrong = write_jsonl(tmp_path / "file_text.jsonl", [{"file_text": 3}])
    with pytest.raises(DataError, match=r"file_text\.jsonl:1: key 'file_text' must be a string"):
        load_corpus(cfg(tmp_path, sources=[str(wrong)], num_workers=workers))
    recs = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(10)] + ["[1, 2]", "{bad"]
    mixed = write_jsonl(tmp_path / "mixed.jsonl", recs)
    corpus = load_corpus(cfg(tmp_path, sources=[str(mixed)], skip_bad=True,
                             num_workers=workers))
    assert corpus.stats["dropped"]["bad_jsonl_line"] == 2
    assert corpus.stats["kept"]["files"] == 10
    assert corpus.stats["read"]["files"] == 12  # what was read: kept + dropped


def test_a_jsonl_line_cut_short_is_named_at_its_end_not_on_a_second_line(tmp_path):
    """A truncated record (the end of a line lost) is not json's "line 2 column 1 (char 48)":
    each record is one line, so the error names its column, and that it is the line's end."""
    cut = '{"input": "def f(x):\\n    return x", "output": '
    bad = write_jsonl(tmp_path / "cut.jsonl", [{"input": "a", "output": "b"}, cut])
    with pytest.raises(DataError, match=rf"cut\.jsonl:2: .*column {len(cut) + 1} "
                                        r"\(the end of the line\).*--skip-bad"):
        load_corpus(cfg(tmp_path, sources=[str(bad)]))


def test_jsonl_nested_too_deeply_for_json_is_a_malformed_line(tmp_path, capsys):
    """json.loads recurses per nesting level: such a line is named, or skipped with skip_bad."""
    deep = write_jsonl(tmp_path / "deep.jsonl", [
        {"repo": "u/r", "path": "a.py", "text": "x = 1\ny = 2\n"}, "[" * 100_000 + "]" * 100_000])
    with pytest.raises(DataError, match=r"deep\.jsonl:2: malformed JSON \(maximum recursion depth"):
        load_corpus(cfg(tmp_path, sources=[str(deep)]))
    corpus = load_corpus(cfg(tmp_path, sources=[str(deep)], skip_bad=True))
    assert corpus.stats["dropped"] == {"bad_jsonl_line": 1} and corpus.stats["kept"]["files"] == 1
    assert dataset.main(["--sources", str(deep), "--cache-dir", str(tmp_path), "--no-progress"]) == 2
    assert "deep.jsonl:2: malformed JSON" in capsys.readouterr().err


def test_names_and_strings_that_are_not_utf8_are_skipped_or_named(tmp_path):
    """A file whose name is not UTF-8 is dropped and counted; a JSONL value holding a
    lone surrogate is an error naming the file, line and key (with skip_bad, a dropped
    line): such text cannot be written."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok.py").write_text("x = 1\ny = 2\n")
    with open(os.path.join(os.fsencode(src), b"\xff\xfe.py"), "wb") as f:
        f.write(b"x = 1\nz = 3\n")
    corpus = load_corpus(cfg(tmp_path, sources=[str(src)]))
    assert corpus.stats["dropped"] == {"not_utf8_name": 1}
    assert corpus.stats["read"]["files"] == 2 and corpus.stats["kept"]["files"] == 1
    assert [d.id for d in corpus.train + corpus.val + corpus.test] == ["src/ok.py"]
    good = {"repo": "u/r", "path": "a.py", "text": "x = 1\ny = 2\n"}
    for key, value in (("text", 'y = "\ud83d"\nz = 1\n'), ("path", "\udcff.py")):
        bad = write_jsonl(tmp_path / f"{key}.jsonl", [good, {**good, key: value}])
        with pytest.raises(DataError, match=rf"{key}\.jsonl:2: key '{key}' holds a lone surrogate"):
            load_corpus(cfg(tmp_path, sources=[str(bad)]))
        corpus = load_corpus(cfg(tmp_path, sources=[str(bad)], skip_bad=True))
        assert corpus.stats["dropped"] == {"bad_jsonl_line": 1}
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"input": "a\ud800", "output": "b"}])
    with pytest.raises(DataError, match=r"pairs\.jsonl:1: key 'input'"):
        load_corpus(cfg(tmp_path, sources=[str(pairs)]))
    seed_002 = write_jsonl(tmp_path / "seed_002.jsonl", [{"file_text": 'y = "\ud83d"\n'}])
    with pytest.raises(DataError, match=r"seed_002\.jsonl:1: key 'file_text' holds a lone"):
        load_corpus(cfg(tmp_path, sources=[str(seed_002)]))


def test_a_record_file_whose_name_is_not_utf8_is_refused_naming_it(tmp_path):
    """A record's id holds its file's name (``file.jsonl:1``), and ids are written as
    UTF-8: a record file whose name is not UTF-8 is a DataError saying to rename it,
    before anything is read."""
    raw = os.path.join(os.fsencode(tmp_path), b"\xffpairs.jsonl")
    with open(raw, "w", encoding="utf-8") as f:
        f.write(json.dumps({"input": "a b c", "output": "d e f"}) + "\n")
    with pytest.raises(DataError, match=r"not valid UTF-8; rename"):
        load_corpus(cfg(tmp_path, task="completion", sources=[os.fsdecode(raw)], **WHOLE))


def test_a_conversations_tools_holding_a_lone_surrogate_are_named_or_skipped(tmp_path):
    """A conversation's ``tools`` are written with its messages: a lone surrogate in them
    (JSON can spell one) is an error naming the file, line and key, and with skip_bad a
    dropped line, as in its messages; the other conversations are kept."""
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    tool = {"type": "function", "function": {"name": "f", "description": "x\ud800"}}
    good = {"messages": [{"role": "user", "content": "hey"}, {"role": "assistant", "content": "yo"}]}
    for tools in ([tool], json.dumps([tool])):  # a list, or its JSON text
        bad = write_jsonl(tmp_path / "chat.jsonl", [good, {"messages": chat, "tools": tools}])
        with pytest.raises(DataError, match=r"chat\.jsonl:2: 'tools' holds a lone surrogate"):
            load_corpus(cfg(tmp_path, task="chat", sources=[str(bad)], **WHOLE))
        corpus = load_corpus(cfg(tmp_path, task="chat", sources=[str(bad)], skip_bad=True,
                                 **WHOLE))
        assert corpus.stats["dropped"] == {"bad_jsonl_line": 1}
        assert corpus.stats["kept"]["files"] == 1


def test_config_values_of_the_wrong_type_or_range_name_the_key(tmp_path):
    """A DataConfig value out of range, or of the wrong type in a config file, is
    refused naming the key and what it must be (an extension without its dot is shown
    with one): the user sees what to change."""
    for key, value, message in (
        ("extensions", [".py", "kt"], "['kt'] must each be a suffix with its dot: ['.kt']"),
        ("extensions", ["rs", "."], "['rs', '.'] must each be a suffix with its dot: ['.rs']"),
        ("near_dedupe_threshold", 5.0, "must be in [0, 1], got 5.0"),
        ("min_lines", -1, "must be >= 0"),
        ("block_size", 1, "must be >= 2"),
        ("max_completion_tokens", 0, "must be >= 1"),  # no example would have a target
        ("window_prompt_tokens", 0, "must be >= 1"),  # no window would have a prompt
        ("max_docs", 0, "must be >= 1"),  # read nothing: "sources hold no files", untrue
        ("num_workers", 0, "must be >= 1"),
    ):
        with pytest.raises(DataError) as info:
            cfg(tmp_path, **{key: value}).validate()
        assert f"DataConfig.{key}" in str(info.value) and message in str(info.value)
    for key, value, message in (  # types: checked where a file or flag gives the value
        ("extensions", 3, "must be a list of strings, got 3"),
        ("sources", [str(EMAIL), 3], "must be a list of strings"),
        ("val_frac", "0.1", "must be a number"),
        ("max_docs", True, "must be an integer"),
    ):
        with pytest.raises(ValueError, match=re.escape(f"c.json: key {key!r} {message}")):
            settings.config_from_dict(DataConfig, {key: value}, "c.json")
    one = settings.config_from_dict(DataConfig, {"extensions": ".kt", "sources": "src"}, "c")
    assert (one.extensions, one.sources) == ([".kt"], ["src"])  # a list's one item, alone
    assert dataset.main(["--near-dedupe", "--near-dedupe-threshold", "5", "--no-progress",
                         "--cache-dir", str(tmp_path)]) == 2
    cfg(tmp_path, max_docs=None, val_frac=0.1, near_dedupe_threshold=1).validate()


def test_empty_corpus_and_missing_source_are_clear_errors(tmp_path):
    """A corpus that cleaning leaves empty, a source that does not exist (a relative one with where
    it was looked for) and an unknown task are each a DataError that says which."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.py").write_text("")
    with pytest.raises(DataError, match="no data left after cleaning"):
        load_corpus(cfg(tmp_path, sources=[str(empty)]))
    with pytest.raises(DataError, match="data source not found: .*nowhere$"):
        load_corpus(cfg(tmp_path, sources=[str(tmp_path / "nowhere")]))
    with pytest.raises(DataError, match=r"not found: nowhere \(read from .*current directory"):
        load_corpus(cfg(tmp_path, sources=["nowhere"]))  # a relative path: where it was looked
    with pytest.raises(DataError, match="DataConfig.task"):
        cfg(tmp_path, task="translate").validate()


def test_sources_that_only_copy_val_documents_say_why_train_is_empty(tmp_path):
    """An empty train split says why: every source file was dropped as a copy of a val document
    (the same files given as a val JSONL), which a bare "the train split is empty" would hide."""
    src = tmp_path / "src"
    src.mkdir()
    texts = {f"m{i}.py": f"def f{i}(x):\n    return x + {i}\n" for i in range(3)}
    for name, text in texts.items():
        (src / name).write_text(text)
    val = write_jsonl(tmp_path / "val.jsonl",
                      [{"repo": "u/r", "path": n, "text": t} for n, t in texts.items()])
    with pytest.raises(DataError) as info:
        load_corpus(cfg(tmp_path, sources=[str(src)], val_sources=[str(val)]))
    said = str(info.value)
    assert all(w in said for w in (f"sources {[str(src)]}", "no train documents", "'val': 3",
                                   "'duplicate': 3", "add data",
                                   "must not also be a training source")), said
    with pytest.raises(DataError, match=r"left no train documents .*dropped: none\); add data$"):
        load_corpus(cfg(tmp_path, sources=[str(src)], train_frac=0.0, val_frac=0.5,
                        test_frac=0.5))


def test_pairs_under_the_lm_task_get_one_note_per_source(tmp_path, tok, capsys):
    """lm, the default task, trains pairs as plain text: a user who forgot --task refactor gets
    a note that there is no prompt masking, once per source. The note comes on cache hits too,
    naming the source as this run spells it."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl",
                        [{"input": f"def f{i}(x):", "output": f"    return x + {i}"}
                         for i in range(4)])
    code = tmp_path / "code"
    code.mkdir()
    (code / "a.py").write_text("x = 1\ny = 2\n")
    respelled = os.path.join(tmp_path, ".", "pairs.jsonl")
    for task, source, hit in (("lm", str(pairs), False), ("lm", respelled, True),
                              ("completion", str(pairs), False)):
        data = prepare(cfg(tmp_path, sources=[str(code), source], task=task, block_size=32,
                           **WHOLE), tok)
        err = capsys.readouterr().err
        assert data.stats["cache_hit"] == hit, task
        if task != "lm":
            assert err == "", task
            continue
        assert len(err.splitlines()) == 1 and err.startswith("note: "), err
        assert all(w in err for w in (source, "4 input/output pairs", "lm task", "plain text",
                                      "--task refactor")), err


def test_second_prepare_loads_from_cache_and_keys_cover_options(tmp_path, tok):
    """A second prepare with the same options loads the same data from the cache;
    another tokenizer, min_lines or block_size gives another cache entry, so data built
    for other options is never reused."""
    c = cfg(tmp_path, task="lm", block_size=32)
    first = prepare(c, tok)
    assert first.stats["cache_hit"] is False
    second = prepare(c, tok)
    assert second.stats["cache_hit"] is True and second.cache_path == first.cache_path
    assert torch.equal(first.train[100]["input_ids"], second.train[100]["input_ids"])
    assert second.stats["corpus"]["kept"] == first.stats["corpus"]["kept"]
    other_tok = CodeTokenizer.train([p.read_text() for p in stdlib_files(EMAIL)], min_freq=5)
    assert prepare(c, other_tok).cache_path != first.cache_path
    assert prepare(cfg(tmp_path, task="lm", block_size=32, min_lines=3), tok).cache_path != (
        first.cache_path
    )
    assert prepare(cfg(tmp_path, task="lm", block_size=48), tok).cache_path != first.cache_path


def test_use_cache_false_rebuilds_and_replaces_a_damaged_entry(tmp_path, tok):
    """use_cache=False ("rebuild, replacing what the cache holds") is the way out of a damaged
    entry, for the corpus and for a task's token files; the next cached run reads the rebuilt
    one. Reference: the first build's documents and tokens."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("charset.py", "quoprimime.py", "base64mime.py"):
        (src / name).write_text((EMAIL / name).read_text("utf-8"))
    c = cfg(tmp_path, sources=[str(src)], task="lm", block_size=32, **WHOLE)
    corpus = load_corpus(c)
    data = prepare(c, tok)
    assert len(corpus.train) == 3
    texts, tokens = corpus.texts("train"), data.train.tokens.tolist()
    (Path(c.cache_dir) / f"corpus-{corpus.key}" / "train.jsonl").write_text("")
    bin_path = data.cache_path / "train.bin"
    bin_path.write_bytes(bytes(bin_path.stat().st_size))
    rebuilt = load_corpus(dataclasses.replace(c, use_cache=False))
    assert rebuilt.stats["cache_hit"] is False and rebuilt.texts("train") == texts
    assert load_corpus(c).texts("train") == texts
    again = prepare(dataclasses.replace(c, use_cache=False), tok)
    assert again.stats["cache_hit"] is False and again.train.tokens.tolist() == tokens
    assert prepare(c, tok).train.tokens.tolist() == tokens


@pytest.mark.parametrize("mtime_shift_ns", [10**9, 0])
def test_an_edited_source_file_of_the_same_size_is_read_again(tmp_path, mtime_shift_ns):
    """The corpus cache is keyed by each file's path, size, mtime and ctime: an in-place edit that
    keeps the size (a fixed typo) must not serve the old text from the cache, also where a copy
    tool (cp -p, rsync -a, tar) set the mtime back to the old one (shift 0): the ctime moved."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text("x = 1\ny = 2\n")
    (src / "b.py").write_text("z = 3\nw = 4\n")
    first = load_corpus(cfg(tmp_path, sources=[str(src)], **WHOLE))
    assert {d.id: d.text for d in first.train}["src/a.py"] == "x = 1\ny = 2\n"
    st = (src / "a.py").stat()
    (src / "a.py").write_text("x = 7\ny = 2\n")
    os.utime(src / "a.py", ns=(st.st_atime_ns, st.st_mtime_ns + mtime_shift_ns))
    second = load_corpus(cfg(tmp_path, sources=[str(src)], **WHOLE))
    assert second.stats["cache_hit"] is False
    assert {d.id: d.text for d in second.train}["src/a.py"] == "x = 7\ny = 2\n"


def test_records_appended_to_a_jsonl_source_are_read(tmp_path):
    """A scraper's JSONL grows as the scraper resumes: the corpus cache key holds the file's
    size and mtime, so the appended records are read, not a stale cache."""
    records = [{"repo": "u/a", "path": "a.py", "text": "x = 1\ny = 2\n"},
               {"repo": "u/b", "path": "b.py", "text": "z = 3\nw = 4\n"}]
    scraped = write_jsonl(tmp_path / "scraped.jsonl", records[:1])
    first = load_corpus(cfg(tmp_path, sources=[str(scraped)], **WHOLE))
    assert [d.id for d in first.train] == ["u/a/a.py"]
    with open(scraped, "a", encoding="utf-8") as f:
        f.write(json.dumps(records[1]) + "\n")
    second = load_corpus(cfg(tmp_path, sources=[str(scraped)], **WHOLE))
    assert sorted(d.id for d in second.train) == ["u/a/a.py", "u/b/b.py"]


def test_a_jsonl_source_edited_in_place_to_the_same_size_is_read_again(tmp_path):
    """As for a directory's files, a JSONL source's cache key holds its mtime, not its size
    alone: a record fixed in place (same byte count) must not serve the old text."""
    scraped = write_jsonl(tmp_path / "scraped.jsonl",
                          [{"repo": "u/a", "path": "a.py", "text": "x = 1\ny = 2\n"}])
    first = load_corpus(cfg(tmp_path, sources=[str(scraped)], **WHOLE))
    assert [d.text for d in first.train] == ["x = 1\ny = 2\n"]
    st = scraped.stat()
    write_jsonl(scraped, [{"repo": "u/a", "path": "a.py", "text": "x = 7\ny = 2\n"}])
    os.utime(scraped, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert scraped.stat().st_size == st.st_size
    second = load_corpus(cfg(tmp_path, sources=[str(scraped)], **WHOLE))
    assert second.stats["cache_hit"] is False
    assert [d.text for d in second.train] == ["x = 7\ny = 2\n"]


def test_a_file_source_that_is_not_jsonl_is_refused_by_name(tmp_path):
    """A single code file given as a source is refused as not JSONL, not read as malformed
    JSON lines (a message pointing at skip_bad, which would then skip every line)."""
    single = tmp_path / "a.py"
    single.write_text("x = 1\ny = 2\n")
    with pytest.raises(DataError, match=r"a\.py: a file source must be JSONL"):
        load_corpus(cfg(tmp_path, sources=[str(single)]))


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_a_build_removes_what_dead_builders_of_this_machine_left(tmp_path):
    """A build removes temporary entries of dead processes of this host and PID
    namespace, and keeps those of a live build, another machine or another
    namespace: only leftovers known dead go."""
    cache = tmp_path / "cache"
    host, dead = socket.gethostname(), _dead_pid()
    ns = process.owner_tag().split("@")[2]
    left = [f".corpus-x.tmp-{dead}@{host}@{ns}@k1l2", f".lm-y.tmp-{dead}@{host}@{ns}@",
            f".data.json.tmp-{dead}@{host}@{ns}@"]  # a file's (process.write_atomic)
    kept = [f".corpus-x.tmp-{os.getpid()}@{host}@{ns}@abcd",  # a build that still runs
            f".corpus-x.tmp-{dead}@other-{host}@{ns}@abcd",  # another machine's, on a shared disk
            f".corpus-x.tmp-{dead}@{host}@{ns}1@abcd"]  # another PID namespace's (a container)
    for name in left + kept:
        (cache / name).mkdir(parents=True)
    corpus = load_corpus(cfg(tmp_path))
    entries = sorted(p.name for p in cache.iterdir())
    assert entries == sorted([*kept, f"corpus-{corpus.key}"])


def test_a_cache_entry_cut_short_is_said_and_built_again(tmp_path, tok, capsys):
    """A published entry whose file is cut short (a disk that filled, a hand edit) is not read:
    its size differs from the entry's manifest, a note names the file, and the entry is built
    again, equal to the first build (a corpus split read as fewer documents than its count,
    or a token file shorter than its windows, would train on less data without a word)."""
    c = cfg(tmp_path)
    data = dataset.prepare(c, tok)
    corpus = load_corpus(c)
    for path, load in ((corpus.train.path, load_corpus), (data.cache_path / "train.bin",
                                                        partial(dataset.prepare, tokenizer=tok))):
        whole = path.read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
        capsys.readouterr()
        again = load(c)
        err = capsys.readouterr().err
        assert f"{path.name}: its bytes differ" in err and f"({len(whole) // 2} bytes" in err
        assert "built again" in err
        assert path.read_bytes() == whole
    assert len(again.train) == len(data.train) and len(load_corpus(c).train) == len(corpus.train)
    assert dataset.prepare(c, tok).stats["cache_hit"]


def test_a_published_cache_entry_is_on_disk_before_its_name(tmp_path, monkeypatch):
    """A cache entry renamed into place unsynced could, after a power loss, hold empty files
    under its name, which every later run would load as the corpus (gigabytes of token files,
    read as cache hits). Each file and directory of the entry is fsynced before the rename, and
    the cache directory after it."""
    synced: list[str] = []
    fsync = os.fsync

    def record(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    corpus = load_corpus(cfg(tmp_path))
    cache = (tmp_path / "cache").resolve()
    entry = cache / f"corpus-{corpus.key}"
    [tmp] = {Path(p).parent for p in synced if Path(p).name == "stats.json"}
    assert tmp.parent == cache and tmp.name.startswith(f".{entry.name}.tmp-")
    files = sorted(p.name for p in entry.iterdir())
    assert sorted(Path(p).name for p in synced if Path(p).parent == tmp
                  and not Path(p).name.startswith(".")) == files  # (not the manifest's temp)
    assert synced[-2:] == [str(tmp), str(cache)]


def test_a_full_disk_under_the_cache_names_the_cache_dir_and_codelm_cache(tmp_path, monkeypatch,
                                                                          capsys):
    """write() and fsync() on a full disk raise an OSError with no file name: the error names
    the cache directory and CODELM_CACHE, so the user need not guess which disk (the cache is
    not the run's)."""
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    cache = tmp_path / "cache"
    assert dataset.main(["--sources", str(EMAIL), "--cache-dir", str(cache), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {cache}: {os.strerror(errno.ENOSPC)} while writing corpus-")
    assert "nothing half-built was kept" in err and "CODELM_CACHE=DIR" in err
    assert list(cache.iterdir()) == []


def test_an_interrupted_corpus_write_leaves_no_temp_dir(tmp_path, monkeypatch):
    """A Ctrl-C while the corpus is written leaves the cache directory empty: no half-written
    temporary entry stays behind to fill the disk."""
    real_asdict = asdict

    def interrupted(obj):
        if isinstance(obj, Doc):  # the corpus is being written
            raise KeyboardInterrupt
        return real_asdict(obj)

    monkeypatch.setattr(shards, "asdict", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_corpus(cfg(tmp_path))
    cache = tmp_path / "cache"
    assert not cache.exists() or list(cache.iterdir()) == []


# The task build waits once its temp dir exists, so that a signal lands mid-build.
SLOW_BUILD = """
import sys, time
import dataset
def build(corpus, tokenizer, cfg, out, work):
    (out / "started").write_text("")
    time.sleep(60)
dataset._build_lm = build
sys.exit(dataset.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig, code", [
    (signal.SIGINT, 130), (signal.SIGTERM, 143),
    pytest.param(signal.SIGHUP, 129, marks=pytest.mark.slow),  # SIGTERM's path: the process module's
    (signal.SIGKILL, -9)], ids=["INT", "TERM", "HUP", "KILL"])
def test_an_interrupted_build_exits_cleanly_and_leaves_nothing(tmp_path, tok, sig, code):
    """Ctrl-C, SIGTERM and a hangup's SIGHUP remove the half-built entry and exit 130/143/129
    with one line (stderr a file: a hangup points a terminal or a pipe at /dev/null); what a
    SIGKILL leaves is removed by the next build. The corpus is json's 5 files: the signal comes
    in the task's build, after it."""
    tok.save(tmp_path / "tok")
    cache = tmp_path / "cache"
    source = str(stdlib_root() / "json")
    argv = ["--task", "lm", "--sources", source, "--tokenizer", str(tmp_path / "tok"),
            "--cache-dir", str(cache), "--no-progress"]
    with open(tmp_path / "stderr", "w") as stderr:
        build = popen([sys.executable, "-c", SLOW_BUILD, *argv],
                      cwd=Path(dataset.__file__).parent, stdout=subprocess.PIPE, stderr=stderr,
                      text=True)
        signal_when(build, lambda: list(cache.glob(".lm-*.tmp-*/started")), sig)
    err = (tmp_path / "stderr").read_text()
    assert build.returncode == code, err
    if sig != signal.SIGKILL:
        assert "Traceback" not in err and err.count("\n") == 1, err
        assert err.startswith("interrupted:"), err
    partial = sorted(p.name for p in cache.iterdir() if ".tmp-" in p.name)
    if sig == signal.SIGKILL:  # the half-built entry, and the mark of its build under way
        assert [p.is_dir() for p in map(cache.joinpath, partial)] == [False, True], partial
        assert "@building-" in partial[0], partial
    else:
        assert partial == [], partial
    prepare(cfg(tmp_path, sources=[source], task="lm", block_size=32), tok)  # the next build
    assert not [p.name for p in cache.iterdir() if ".tmp-" in p.name]


def test_every_option_that_changes_the_data_changes_a_cache_key(tmp_path):
    """Changing any DataConfig field that is not a runtime setting changes the corpus key or the
    task's key: no option alters the data and still hits an entry built without it."""
    base = cfg(tmp_path)
    task_of = {
        "completion_style": "completion",
        "window_prompt_tokens": "completion",
        "window_completion_tokens": "completion",
        "window_stride": "completion",
        "docstring_targets": "docstring",
        "docstring_min_tokens": "docstring",
        "docstring_code_tokens": "docstring",
        "docstring_prompt": "docstring",
        "fim_rate": "fim",
        "add_eos": "method",
        "max_prompt_tokens": "method",
        "max_completion_tokens": "method",
        "pair_special_tokens": "refactor",
        "project_composer": "project",
    }
    changed = {
        "sources": [str(EMAIL), "stdlib"],
        "val_sources": [str(stdlib_root() / "json")],
        "test_sources": [str(stdlib_root() / "json")],
        "extensions": [".py", ".pyi"],
        "split_by": "file",
        "completion_style": "line",
        "docstring_targets": "both",
        "docstring_prompt": "verbose",
        "task": "fim",
        "window_stride": 3,
        "max_prompt_tokens": 7,
        "max_docs": 5,
        "max_completion_tokens": 7,
        "text_column": "content",
        "input_column": "before",
        "output_column": "after",
        "project_composer": "bm25",
    }
    from dataclasses import fields, replace

    for f in fields(DataConfig):
        if f.name in _RUNTIME_FIELDS:
            continue
        value = getattr(base, f.name)
        if f.name in changed:
            new = changed[f.name]
        else:
            new = not value if isinstance(value, bool) else value + 1
        if f.name == "lines_per_file":
            task = "completion"
            before = replace(base, task=task, completion_style="line")
        else:
            task = task_of.get(f.name, "lm")
            before = replace(base, task=task)
        after = replace(before, **{f.name: new})
        keys = (corpus_key, dataset._task_options)
        assert any(k(before) != k(after) for k in keys), f.name


def test_the_trained_tokenizer_cache_is_keyed_by_the_encoding_version(tmp_path, monkeypatch):
    """Training counts pieces with the encoding's regex and cut: after an upgrade of either
    (ENCODING_VERSION) the vocabulary is retrained, not reused from the cache while the token
    files are rebuilt."""
    base = cfg(tmp_path)
    before = tokenizer_cache_dir(base, 10, 8000)
    assert before.parent == Path(base.cache_dir) and before.name.startswith("tokenizer-")
    assert tokenizer_cache_dir(base, 10, 8000) == before
    assert tokenizer_cache_dir(base, 2, 8000) != before
    assert tokenizer_cache_dir(base, 10, None) != before
    assert tokenizer_cache_dir(cfg(tmp_path, strip_comments=True), 10, 8000) != before
    monkeypatch.setattr(encoding, "ENCODING_VERSION", ENCODING_VERSION + "-other")
    assert tokenizer_cache_dir(base, 10, 8000) != before


def test_kotlin_sources_lose_copyright_and_long_literals(tmp_path, tok):
    """Kotlin sources read with extensions ['.kt'] lose their copyright headers, a file
    with a very long literal is dropped, a .py file beside them is not read, and the
    completion task builds from the rest."""
    src = tmp_path / "kotlin"
    (src / "core").mkdir(parents=True)
    header = "/*\n * Copyright 2010-2023 JetBrains s.r.o. and Kotlin Programming Language\n"
    header += " * contributors.\n * Use of this source code is governed by the Apache 2.0\n"
    header += " * license.\n */\n\n"
    body = "package core\n\nfun add(a: Int, b: Int): Int {\n    return a + b\n}\n"
    for i in range(12):
        (src / "core" / f"F{i}.kt").write_text(header + body.replace("add", f"add{i}"))
    (src / "core" / "Strings.kt").write_text(
        body + 'const val S127 = "-' + "\\uD83C\\uDF10-" * 50 + '"\n'
    )
    (src / "core" / "script.py").write_text("print('not kotlin')\n")
    c = cfg(
        tmp_path,
        sources=[str(src)],
        extensions=[".kt"],
        task="completion",
        window_prompt_tokens=8,
        window_completion_tokens=4,
    )
    corpus = load_corpus(c)
    assert corpus.stats["read"]["files"] == 13
    assert corpus.stats["dropped"] == {"long_literal": 1}
    assert corpus.stats["modified"] == {"license_header_removed": 12}
    assert all(d.text.startswith("package core") for d in corpus.train + corpus.val + corpus.test)
    data = prepare(c, tok)
    assert len(data.train) >= 10 and len(data.val) >= 1


def test_tokenizer_free_pass_gives_split_texts(tmp_path):
    """prepare without a tokenizer gives each split's cleaned texts (the corpus's, licence headers
    gone), and max_docs limits the files read: the texts a tokenizer is trained on."""
    data = prepare(cfg(tmp_path), None)
    corpus = load_corpus(cfg(tmp_path))
    assert list(data.train) == corpus.texts("train") and len(data.val) == len(corpus.val)
    originals = {strip_license_header(t)[0] for t in email_texts().values()}
    assert set(data.train) <= originals
    sample = prepare(cfg(tmp_path, max_docs=5), None)
    assert sample.stats["corpus"]["read"]["files"] == 5


def test_cli_prints_counts_and_exits_2_on_bad_input(tmp_path, capsys):
    """dataset.py prints the stats as JSON on stdout (29 email files read, 22/3/3 split by file)
    and exits 2 with an error line for a source that does not exist."""
    assert (
        dataset.main(["--sources", str(EMAIL), "--cache-dir", str(tmp_path), "--no-progress"]) == 0
    )
    stats = json.loads(capsys.readouterr().out)
    assert stats["corpus"]["read"]["files"] == 29 and stats["corpus"]["kept"]
    assert stats["corpus"]["split"] == {"train": 22, "val": 3, "test": 3}
    assert stats["corpus"]["split_by"] == "file"
    assert dataset.main(["--sources", str(tmp_path / "none"), "--cache-dir", str(tmp_path)]) == 2
    assert "error: data source not found" in capsys.readouterr().err


@pytest.mark.slow
def test_full_stdlib_pipeline_builds_lm_and_hits_cache(tmp_path, capsys):
    """The whole standard library, every file read and a non-UTF-8 one dropped,
    builds an lm dataset of over a million tokens; a second build and the
    command line load it from the cache."""
    c = DataConfig(cache_dir=str(tmp_path), progress=False, num_workers=2)
    texts = prepare(c, None)
    tok = CodeTokenizer.train(texts.train, min_freq=10)
    data = prepare(c, tok)
    stats = data.stats["corpus"]
    assert stats["read"]["files"] == len(stdlib_files()) and stats["dropped"]["not_utf8"] >= 1
    assert data.train.n_tokens > 1_000_000 and not data.stats["cache_hit"]
    again = prepare(c, tok)
    assert again.stats["cache_hit"] and again.train.n_tokens == data.train.n_tokens
    tok.save(tmp_path / "tok")
    assert (
        dataset.main(
            [
                "--cache-dir",
                str(tmp_path),
                "--tokenizer",
                str(tmp_path / "tok"),
                "--no-progress",
                "--num-workers",
                "2",
            ]
        )
        == 0
    )
    stats = json.loads(capsys.readouterr().out)
    assert "dropped" in stats["corpus"] and "n_tokens" in stats["task"] and stats["cache_hit"]


def test_an_empty_codelm_cache_is_unset(monkeypatch):
    """`CODELM_CACHE= python ...` leaves the default cache, not ./data beside the user's files."""
    monkeypatch.setenv("HOME", "/home/someone")
    monkeypatch.setenv("CODELM_CACHE", "")
    assert DataConfig().cache_dir == "/home/someone/.cache/codelm/data"


def test_a_cache_dir_that_cannot_be_made_names_its_setting(tmp_path, monkeypatch, capsys):
    """`CODELM_CACHE=cachefile python dataset.py` names, beside "cachefile/data: Not a
    directory", the variable the user set (or the --cache-dir flag): that is what to fix."""
    blocker = tmp_path / "cachefile"
    blocker.write_text("")
    monkeypatch.setenv("CODELM_CACHE", str(blocker))
    assert dataset.main(["--sources", str(EMAIL), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert all(w in err for w in (str(blocker / "data"), "Not a directory",
                                  f"CODELM_CACHE={blocker}", "point CODELM_CACHE",
                                  "data_options.cache_dir")), err
    assert dataset.main(["--sources", str(EMAIL), "--cache-dir", str(blocker / "c"),
                         "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "CODELM_CACHE" not in err, err
    assert all(w in err for w in (f"--cache-dir {blocker / 'c'}", "cannot create",
                                  "Not a directory")), err


def test_an_empty_jsonl_source_is_named_as_holding_nothing(tmp_path, tok):
    """A scrape that kept nothing leaves an empty .jsonl: the error says it is empty, not to
    check the extensions (which apply to directories only) and the cleaning limits."""
    empty = tmp_path / "kt.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"^sources \[.*kt\.jsonl'\] .*no JSONL records.*"
                                        r"an empty \.jsonl"):
        prepare(cfg(tmp_path, sources=[str(empty)]), tok)


def test_a_folder_of_other_code_is_named_with_the_extensions_that_read_it(tmp_path, tok):
    """A Kotlin project given to a run that reads .py files: the error names the code the
    folder holds and the data option that reads it; a folder of no code, its files' kinds."""
    project = tmp_path / "kotlin"
    (project / "src").mkdir(parents=True)
    for i in range(3):
        (project / "src" / f"A{i}.kt").write_text(f"fun f{i}() = {i}\n")
    (project / "build.gradle.kts").write_text("plugins {}\n")
    with pytest.raises(DataError) as err:
        prepare(cfg(tmp_path, sources=[str(project)]), tok)
    message = str(err.value)
    assert "hold no files with extensions ['.py']" in message
    assert "3 .kt" in message and '--data-options \'{"extensions": [".kt", ".kts"]}\'' in message
    notes = tmp_path / "notes"  # no code at all: the files it holds, as they are
    (notes / ".git" / "hooks").mkdir(parents=True)
    for name in ("a.md", "b.md", "c.txt", ".git/hooks/x.sample", ".git/hooks/y.sample"):
        (notes / name).write_text("# words\n")
    with pytest.raises(DataError,
                       match=r'2 \.md, 1 \.txt files.*\{"extensions": \[".md", ".txt"\]\}'):
        prepare(cfg(tmp_path, sources=[str(notes)]), tok)


def test_a_folder_of_record_files_is_named_with_the_files_as_sources(tmp_path, tok):
    """A folder of JSONL (or parquet) files given as a source: the error says its records are
    read from the files given as sources, not an extension option that would read each file
    as one text; such an extension is refused, naming the way that reads the records."""
    shards = tmp_path / "shards"
    shards.mkdir()
    for name in ("a.jsonl", "b.jsonl", "c.jsonl.gz"):
        (shards / name).write_text("{}\n")
    with pytest.raises(DataError) as err:
        prepare(cfg(tmp_path, sources=[str(shards)]), tok)
    message = str(err.value)
    assert "2 .jsonl, 1 .jsonl.gz files" in message and f"--data {shards}/*.jsonl" in message
    assert "--data-options" not in message, message  # no extension reads records
    with pytest.raises(DataError, match=r"extensions: \['\.jsonl'\] are files of records.*"
                                        r"--data DIR/\*\.jsonl"):
        prepare(cfg(tmp_path, sources=[str(shards)], extensions=[".jsonl"]), tok)


def test_a_git_clone_without_a_checkout_is_named_as_one(tmp_path, tok):
    """A clone made with --no-checkout holds only .git: the error says so and how to fill it."""
    clone = tmp_path / "clone"
    (clone / ".git").mkdir(parents=True)
    with pytest.raises(DataError) as err:
        prepare(cfg(tmp_path, sources=[str(clone)]), tok)
    assert f"{clone} holds only .git: a clone without a checkout (git checkout" in str(err.value)


def test_refactor_on_code_files_says_it_needs_pairs(tmp_path, tok):
    """Scraper records or a directory given to the refactor task: the error says what the data
    holds and what the task needs, naming a file of it."""
    text = "".join(f"value_{i} = compute({i})\n" for i in range(12))
    records = [{"repo": "o/r", "path": f"m{i}.py", "text": f"# {i}\n{text}"} for i in range(5)]
    scraped = write_jsonl(tmp_path / "scraped.jsonl", records)
    with pytest.raises(DataError, match=r"refactor task.*\{'input', 'output'\}.*code files"
                                        r".*o/r/m\d\.py"):
        prepare(cfg(tmp_path, task="refactor", sources=[str(scraped)]), tok)


@pytest.mark.parametrize("task", ["method", "completion", "refactor"])
def test_a_long_prompt_completion_pair_keeps_the_end_of_its_prompt(tmp_path, tok, task):
    """A {prompt, completion} pair is used verbatim: a prompt over the context loses its start,
    never the text right before the completion (what conditions it), as fit_prompt cuts."""
    body = "".join(f"value_{i} = compute(value_{i - 1}, {i})\n" for i in range(1, 60))
    records = [{"prompt": f"# file {k}\n" + body + f"def answer_{k}(x):\n",
                "completion": f"    return x + {k}\n"} for k in range(3)]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", records)
    data = prepare(cfg(tmp_path, sources=[str(pairs)], task=task, block_size=64,
                       train_frac=1.0, val_frac=0.0, test_frac=0.0), tok)
    by_completion = {tuple(tok.encode(r["completion"]) + [tok.eos_id]): tok.encode(r["prompt"])
                     for r in records}
    assert len(data.train) == 3
    for i in range(3):
        prompt, completion = prompt_and_completion(data.train[i])
        whole = by_completion[tuple(completion)]
        assert len(prompt) < len(whole) and prompt == whole[-len(prompt):]


def test_a_decorated_method_prompt_keeps_decorators_and_signature_in_its_head():
    """method_examples: head = decorators + every def line, body = the docstring's text (what
    a too-long prompt loses first), tail = its closing quotes' line, so no signature line can be
    cut away."""
    src = ("class A:\n"
           "    @staticmethod\n"
           "    @functools.cache\n"
           "    def f(a,\n"
           "          b):\n"
           '        """Add them.\n\n        Long text.\n        """\n'
           "        return a + b\n")
    (e,) = method_examples(Doc("m.py", src))
    assert e.head == "@staticmethod\n@functools.cache\ndef f(a,\n      b):\n"
    assert e.body == '    """Add them.\n\n    Long text.\n' and e.tail == '    """\n'
    assert e.completion == "    return a + b"


def test_fim_parts_of_a_comment_stripping_tokenizer_keep_their_text():
    """A CodeTokenizer with strip_comments strips a whole file; a PSM part that parses alone
    (the tail of a string holding ' # ', a string literal) is not stripped again, which would
    lose its text. Files of one chunk with room to spare: nothing is cut to fit, so prefix + middle +
    suffix is the file. Reference: the file's text."""
    texts = [f's{i} = "a # b{i}"\nd{i} = """doc {i}"""\n' for i in range(60)]
    tok = CodeTokenizer.train(texts, min_freq=1, strip_comments=True)
    c = DataConfig(task="fim", fim_rate=1.0, block_size=64)
    for i, text in enumerate(texts):
        ids = tok.encode(text)
        assert tok.decode(ids) == text and len(ids) < 40  # nothing stripped, one chunk
        ((prompt, middle),) = fim_pairs([(ids, f"strip_{i}.py")], tok, c)[0]
        k = prompt.index(tok.fim_suffix_id)
        parts = (tok.decode(prompt[1:k]), tok.decode(middle), tok.decode(prompt[k + 1 : -1]))
        assert "".join(parts) == text, parts


def test_fim_examples_after_a_template_prefix_keep_their_first_sentinel(tmp_path):
    """A tokenizer with FIM tokens and a BOS template (Llama-3's post-processor): every example
    starts with the BOS, and chunks are sized with it: sized without it they would overflow
    block_size by one, and the cut to fit would take the prompt's first token, <fim_prefix>."""
    from tiny_hf import train_hf_tokenizer

    from tokenizer import load_tokenizer

    texts = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(200)]
    hf = train_hf_tokenizer("llama3", texts, tmp_path / "tokenizer.json")
    hf.add_special_tokens(["<fim_prefix>", "<fim_middle>", "<fim_suffix>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert tok.template_prefix == [hf.token_to_id("<|begin_of_text|>")]
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"m{i}.py").write_text("".join(texts[i * 10 : (i + 1) * 10]))
    data = prepare(cfg(tmp_path, sources=[str(src)], task="fim", block_size=32, fim_rate=1.0,
                       **WHOLE), tok)
    sentinels = [tok.fim_prefix_id, tok.fim_suffix_id, tok.fim_middle_id]
    n = 0
    for i in range(len(data.train)):
        prompt, completion = prompt_and_completion(data.train[i])
        assert len(prompt) + len(completion) <= 33
        if tok.fim_middle_id in prompt:
            assert prompt[:2] == [*tok.template_prefix, tok.fim_prefix_id]
            assert [t for t in prompt if t in sentinels] == sentinels
            n += 1
    assert n > 30
    assert "prompt_truncated" not in data.stats["task"]["events"]["train"]


def test_credentials_become_placeholders_and_templates_stay_code():
    """A scrape's settings files carry live keys; a model trained on them repeats them."""
    key_body = "MIIEpAIBAAKCAQEA7" + "x" * 60
    text = (f'KEY = """-----BEGIN RSA PRIVATE KEY-----\n{key_body}\n-----END RSA PRIVATE KEY-----"""\n'
            f'ONE_LINE = "-----BEGIN PRIVATE KEY-----\\n{key_body}\\n-----END PRIVATE KEY-----"\n'
            'aws_access_key_id = "AKIAQ7RSTUVWXYZ23456"\n'
            'aws_secret_access_key = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"\n'
            f'TOKEN = "ghp_{"a1B2" * 9}"\n'
            'HOOK = "https://hooks.slack.com/services/T000/B000/XXXXXXXX"  # xoxb-1234-5678-abcdef\n'
            'DB = "postgres://admin:hunter2@db.internal:5432/app"\n')
    redacted, n = redact_secrets(text)
    assert n == 8
    assert redacted == (
        'KEY = """-----BEGIN RSA PRIVATE KEY-----<PRIVATE_KEY>-----END RSA PRIVATE KEY-----"""\n'
        'ONE_LINE = "-----BEGIN PRIVATE KEY-----<PRIVATE_KEY>-----END PRIVATE KEY-----"\n'
        'aws_access_key_id = "<AWS_ACCESS_KEY_ID>"\n'
        'aws_secret_access_key = "<AWS_SECRET_ACCESS_KEY>"\n'
        'TOKEN = "<GITHUB_TOKEN>"\n'
        'HOOK = "<SLACK_TOKEN>"  # <SLACK_TOKEN>\n'
        'DB = "postgres://admin:<PASSWORD>@db.internal:5432/app"\n')
    assert redact_secrets(redacted) == (redacted, 0)
    # code that builds a key or a URL from parts is left as it is
    code = ('pem = "-----BEGIN PRIVATE KEY-----\\n" + body + "\\n-----END PRIVATE KEY-----"\n'
            'url = "postgres://%s:%s@%s" % (user, pw, host)\n'
            'url = f"postgres://{user}:{pw}@{host}"\nurl = "redis://user:$PASSWORD@host"\n')
    assert redact_secrets(code) == (code, 0)


@pytest.mark.parametrize("code", [
    "sub_fun = partial(m.sub, '\\\\1://***:***@')\n",  # pytest-benchmark masks hosts so
    '"""URLs of the form "git://[path-to-repo[:]][ref@]path/to/file"."""\n',  # fsspec's git
    "pip install --index-url https://[user:passwd@]host/simple\n",
    'engine = create_engine("postgresql://scott:tiger@localhost/test")\n',
    'url = "http://User:Pass@www.python.org:080/doc/"\nassert p.password == "Pass"\n',
    'client("s3", aws_access_key_id="AKIAIOSFODNN7EXAMPLE")\n',  # AWS's documentation keys
    'key_id = "AKIAEXAMPLE123456789"\n',
], ids=["mask", "syntax", "syntax-in-brackets", "scott-tiger", "test-url", "aws-doc", "aws-doc-2"])
def test_masks_placeholders_and_url_syntax_are_not_credentials(code):
    """Seen over site-packages and the stdlib: a mask string that code substitutes, a URL
    syntax's brackets and documentation's placeholder passwords and AWS example keys are left
    alone (not the mask turned into '***:<PASSWORD>@', a test's URL away from its assertion)."""
    assert redact_secrets(code) == (code, 0)


def test_email_redaction_leaves_matrix_products_and_git_remotes_alone():
    """redact_emails leaves scipy's L@D@L.conjugate().T and a q@k.transpose(-2, -1) as code (no
    '<EMAIL>()' calls), and a git@github.com:owner/repo remote as it is."""
    code = ("scores = q@k.transpose(-2, -1)\nassert_allclose(A, L@D@L.conjugate().T)\n"
            "REMOTE = 'git@github.com:owner/repo.git'\n")
    assert cleaning.EMAIL.sub("<EMAIL>", code) == code
    assert cleaning.EMAIL.sub("<EMAIL>", "# by ann@example.com.\n") == "# by <EMAIL>.\n"


def test_cleaning_redacts_credentials_by_default_and_emails_when_asked(tmp_path):
    """stats["modified"] counts the kept files rewritten: a file redacted, then dropped (a line
    too long, a copy of a kept one), counts among the dropped alone."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "settings.py").write_text('# by ann@example.com\nTOKEN = "ghp_' + "z" * 36 + '"\n')
    (src / "settings_copy.py").write_text((src / "settings.py").read_text())
    (src / "wide.py").write_text('KEY = "ghp_' + "y" * 36 + '"  # ' + "w" * 2000 + "\nx = 1\n")
    (src / "plain.py").write_text("x = 1\ny = 2\n")
    texts = {}
    for name, options in {"default": {}, "off": {"redact_secrets": False},
                          "emails": {"redact_emails": True}}.items():
        docs, stats = clean_corpus(cfg(tmp_path, sources=[str(src)], **options))
        texts[name] = next(d.text for d in docs if d.id.endswith("settings.py"))
        texts[name, "modified"] = stats["modified"]
    assert texts["default"] == '# by ann@example.com\nTOKEN = "<GITHUB_TOKEN>"\n'
    assert texts["default", "modified"] == {"secrets_redacted": 1}
    assert texts["off"] == (src / "settings.py").read_text()
    assert texts["emails"] == '# by <EMAIL>\nTOKEN = "<GITHUB_TOKEN>"\n'
    assert texts["emails", "modified"] == {"emails_redacted": 1, "secrets_redacted": 1}
    assert stats["dropped"] == {"duplicate": 1, "long_line": 1}


def test_pair_records_are_redacted_as_documents_are(tmp_path):
    """A model trained on pairs (refactor, SFT records, or pairs packed by the lm task) must not
    learn a live key either: the prompt and the completion get the same placeholders."""
    key = "ghp_" + "z" * 36
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"input": f'token = "{key}"  # ann@example.com\n', "output": f'TOKEN = "{key}"\n'},
        {"prompt": "x = 1\n", "completion": "y = 2\n"}])
    docs, stats = clean_corpus(cfg(tmp_path, sources=[str(pairs)], redact_emails=True))
    assert [(d.text, d.target) for d in docs] == [
        ('token = "<GITHUB_TOKEN>"  # <EMAIL>\n', 'TOKEN = "<GITHUB_TOKEN>"\n'),
        ("x = 1\n", "y = 2\n")]
    assert stats["modified"] == {"emails_redacted": 1, "secrets_redacted": 1}
    docs, stats = clean_corpus(cfg(tmp_path, sources=[str(pairs)], redact_secrets=False))
    assert key in docs[0].text and key in docs[0].target and stats["modified"] == {}


def test_conversations_are_redacted_in_every_text_a_template_renders(tmp_path):
    """A chat template renders a tool call's arguments, an answer's reasoning and the tools'
    definitions as it renders the content, so a chat run learns a key from any of them: each
    gets the placeholder, the conversation counted once. Reference: the record with the key
    replaced by hand."""
    key = "ghp_" + "z" * 36
    call = {"type": "function", "function": {"name": "push", "arguments": {"token": key}}}
    messages = [{"role": "user", "content": f"push with {key}"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "content": "ok"},
                {"role": "assistant", "content": "Done.", "reasoning_content": f"I sent {key}"}]
    tools = [{"type": "function", "function": {"name": "push", "description": f"e.g. {key}"}}]
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": messages, "tools": tools}])
    docs, stats = clean_corpus(cfg(tmp_path, sources=[str(chats)]))
    expected = json.loads(json.dumps(messages).replace(key, "<GITHUB_TOKEN>"))
    assert [d.messages for d in docs] == [expected]
    assert [d.tools for d in docs] == [json.loads(json.dumps(tools).replace(key,
                                                                           "<GITHUB_TOKEN>"))]
    assert stats["modified"] == {"secrets_redacted": 1}


@pytest.mark.parametrize("secret, placeholder", [
    ("ASIAIOSFODNN7QWERTYU", "<AWS_ACCESS_KEY_ID>"),  # a temporary (STS) key id
    ("gho_" + "a1B2" * 9, "<GITHUB_TOKEN>"),  # OAuth, user-to-server, server-to-server,
    ("ghu_" + "a1B2" * 9, "<GITHUB_TOKEN>"),  # refresh tokens besides ghp_ personal ones
    ("ghs_" + "a1B2" * 9, "<GITHUB_TOKEN>"),
    ("ghr_" + "a1B2" * 9, "<GITHUB_TOKEN>"),
    ("github_pat_" + "A1b2C3d4E5f6G7h8I9j0K1" + "_" + "z9" * 29 + "Q", "<GITHUB_TOKEN>"),
    ("xoxa-2-1234567890-abcdef", "<SLACK_TOKEN>"),
    ("xoxp-1234567890-abcdef", "<SLACK_TOKEN>"),
    ("xoxr-1234567890-abcdef", "<SLACK_TOKEN>"),
    ("xoxs-1234567890-abcdef", "<SLACK_TOKEN>"),
], ids=["asia", "gho", "ghu", "ghs", "ghr", "github_pat", "xoxa", "xoxp", "xoxr", "xoxs"])
def test_each_token_kind_is_redacted_alone_in_a_text(secret, placeholder):
    """Each kind in a text that holds no other (a text is searched only for the patterns
    whose marker strings it holds): the token's documented prefix is that marker."""
    assert redact_secrets(f'TOKEN = "{secret}"\n') == (f'TOKEN = "{placeholder}"\n', 1)


def test_an_env_file_aws_secret_in_capitals_is_redacted():
    """.env and shell files spell it AWS_SECRET_ACCESS_KEY, in capitals."""
    text = "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n"
    assert redact_secrets(text) == (
        "AWS_SECRET_ACCESS_KEY=<AWS_SECRET_ACCESS_KEY>\n", 1)


def test_near_miss_credentials_are_not_redacted():
    """A key id one character long, a 41-character 'secret', an elided key in documentation:
    none is the credential's shape, and code is not to be changed for them."""
    text = ('ID = "AKIAIOSFODNN7QWERTYUX"\n'
            'aws_secret_access_key = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEYX"\n'
            '"""-----BEGIN PRIVATE KEY-----\n...\n-----END PRIVATE KEY-----"""\n')
    assert redact_secrets(text) == (text, 0)


def test_each_key_of_a_pem_chain_is_redacted_on_its_own():
    """Two keys one after the other (a PEM bundle) stay two keys, each kept between its lines."""
    text = "".join(f"-----BEGIN PRIVATE KEY-----\n{body * 64}\n-----END PRIVATE KEY-----\n"
                   for body in "AB")
    key = "-----BEGIN PRIVATE KEY-----<PRIVATE_KEY>-----END PRIVATE KEY-----\n"
    assert redact_secrets(text) == (key * 2, 2)


def test_a_private_keys_body_of_sixteen_characters_is_redacted_and_shorter_is_not():
    """A private key's body of 16 characters between its BEGIN and END lines is redacted and one of
    15 is not: the threshold keeps short placeholders as written and takes real keys out."""
    begin, end = "-----BEGIN EC PRIVATE KEY-----", "-----END EC PRIVATE KEY-----"
    assert redact_secrets(begin + "A" * 16 + end) == (begin + "<PRIVATE_KEY>" + end, 1)
    assert redact_secrets(begin + "A" * 15 + end) == (begin + "A" * 15 + end, 0)


def test_a_private_key_with_a_quote_inside_is_not_redacted():
    """The body stops at a quote: code joining a key's parts is code, not a credential."""
    text = '-----BEGIN PRIVATE KEY-----' + "A" * 20 + "'" + "B" * 20 + '-----END PRIVATE KEY-----'
    assert redact_secrets(text) == (text, 0)
    assert redact_secrets(text.replace("'", '"')) == (text.replace("'", '"'), 0)


def test_an_email_address_on_a_subdomain_is_redacted_whole(tmp_path):
    """redact_emails replaces an address on a multi-part domain (mail.example.co.uk) whole with
    <EMAIL>: no piece of the domain is left beside the placeholder."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text('# ann.lee@mail.example.co.uk\nx = 1\n')
    docs, _ = clean_corpus(cfg(tmp_path, sources=[str(src)], redact_emails=True))
    assert [d.text for d in docs] == ["# <EMAIL>\nx = 1\n"]


# ---- parquet files and datasets directories ---------------------------------------------

REFACTOR_PAIRS = [{"input": f"def f{i}(x):\n    y = x + {i}\n    return y\n",
                   "output": f"def f{i}(x):\n    return x + {i}\n"} for i in range(30)]


def _examples(data) -> list:
    return sorted((e["input_ids"].tolist(), e["labels"].tolist()) for e in data.train)


def test_parquet_and_datasets_directories_give_the_examples_their_jsonl_gives(tmp_path):
    """The same pairs as a JSONL file, a parquet file (several row groups, own column names) and
    a `datasets` save_to_disk directory build the same refactor examples."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tokenizer import CodeTokenizer

    tok = CodeTokenizer.train([p["input"] + p["output"] for p in REFACTOR_PAIRS], min_freq=1)
    jsonl = write_jsonl(tmp_path / "pairs.jsonl", REFACTOR_PAIRS)
    parquet = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"before": [p["input"] for p in REFACTOR_PAIRS],
                             "after": [p["output"] for p in REFACTOR_PAIRS]}), parquet,
                   row_group_size=7)
    assert pq.ParquetFile(parquet).num_row_groups == 5
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(REFACTOR_PAIRS).save_to_disk(str(saved))
    common = dict(task="refactor", block_size=64, **WHOLE)  # a split hashes the file's name
    want = _examples(prepare(cfg(tmp_path, sources=[str(jsonl)], **common), tok))
    assert len(want) == 30
    columns = {"input_column": "before", "output_column": "after"}
    for source, options in ((parquet, columns), (saved, {})):
        got = prepare(cfg(tmp_path, sources=[str(source)], **common, **options), tok)
        assert _examples(got) == want, source


def test_the_repository_columns_of_published_corpora_name_a_records_repo(tmp_path,
                                                                         capsys):
    """A code corpus as published (codeparrot's and The Stack v2's repo_name and path, The
    Stack v1's max_stars_repo_name and max_stars_repo_path; content as its text column) names
    each record's repository, so its split keeps a repository's files together."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    repos = [f"org/repo{i % 6}" for i in range(36)]
    texts = [f"def f{i}():\n    return {i}\n" for i in range(36)]
    paths = [f"/pkg/m{i}.py" for i in range(36)]  # The Stack v2's paths open with /
    stack2 = tmp_path / "stack2.parquet"
    pq.write_table(pa.table({"content": texts, "repo_name": repos, "path": paths}), stack2)
    stack1 = write_jsonl(tmp_path / "stack1.jsonl", [  # an empty repo names none
        {"content": t, "repo": "", "max_stars_repo_name": r, "max_stars_repo_path": p[1:]}
        for t, r, p in zip(texts, repos, paths)])
    for source in (stack2, stack1):
        corpus = load_corpus(cfg(tmp_path, sources=[str(source)], text_column="content"))
        assert corpus.stats["split_by"] == "repo"
        docs = {s: getattr(corpus, s) for s in ("train", "val", "test")}
        assert all(doc.id == f"{doc.repo}/pkg/{doc.id.rsplit('/', 1)[1]}" for ds in docs.values()
                   for doc in ds)
        held = {doc.repo for doc in docs["val"] + docs["test"]}
        assert held and held.isdisjoint(doc.repo for doc in docs["train"]), source
    load_corpus(cfg(tmp_path, sources=[str(stack2)], text_column="content", extensions=[".js"]))
    err = capsys.readouterr().err
    assert f"note: {stack2}: its records are all read" in err, err
    assert "extensions ['.js']" in err and "code directories only" in err, err


@pytest.mark.parametrize("damage", ["garbage", "cut"])
def test_a_damaged_parquet_or_arrow_file_is_an_error_naming_it(tmp_path, damage):
    """pyarrow's own messages ("Parquet magic bytes not found in footer") name no file: a
    parquet file or a datasets Arrow file that does not read is a DataError naming its path."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [(EMAIL / name).read_text() for name in ("charset.py", "utils.py", "errors.py")]
    parquet = tmp_path / "code.parquet"
    pq.write_table(pa.table({"text": texts}), parquet)
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(saved))
    arrow = next(saved.glob("*.arrow"))
    for file, source in ((parquet, parquet), (arrow, saved)):
        data = file.read_bytes()
        file.write_bytes(b"not a table at all" if damage == "garbage" else data[: len(data) // 2])
        with pytest.raises(DataError, match=f"{re.escape(str(file))}: cannot read the"):
            load_corpus(cfg(tmp_path, sources=[str(source)]))


def _code_lines(count: int = 200) -> bytes:
    return "".join(json.dumps({"text": f"def f{i}():\n    return {i}\n"}) + "\n"
                   for i in range(count)).encode()


def _flipped(data: bytes, at: int | None = None) -> bytes:
    """``data`` with one bit of byte ``at`` (None: the middle one) flipped."""
    damaged = bytearray(data)
    damaged[len(data) // 2 if at is None else at] ^= 0x04
    return bytes(damaged)


def _written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _not_utf8_parquet(path: Path) -> Path:
    """A parquet file whose text column holds a byte that is no UTF-8."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = pa.array([b"x = 1\n", b"y = '\xff'\n"], pa.binary())
    pq.write_table(pa.table({"text": pa.Array.from_buffers(pa.string(), 2, raw.buffers())}), path)
    return path


def _stateless_datasets_dir(path: Path) -> Path:
    """A datasets save_to_disk directory whose state.json lists no data files."""
    path.mkdir()
    (path / "state.json").write_text("{}")
    (path / "dataset_info.json").write_text("{}")
    return path / "state.json"


def _damaged_sources() -> list:
    """(name, a writer of the source returning the file the error names, words of the error)
    of each way a data source can fail to read: damaged or cut compressed streams (a .jsonl
    is read decompressed when its bytes say so), bytes that are not UTF-8, a line that is not
    JSON, a damaged parquet file, a datasets directory whose state lists no files."""
    import bz2
    import gzip
    import lzma

    lines = _code_lines()
    damaged = "damaged or truncated"
    return [
        ("gz-flipped.jsonl", lambda p: _written(p, _flipped(gzip.compress(lines, mtime=0), 12)),
         ("cannot read the JSONL file", "Error -3 while decompressing", damaged)),
        ("gz-cut.jsonl", lambda p: _written(p, gzip.compress(lines, mtime=0)[:-30]),
         ("after line", "ended before the end-of-stream marker", damaged)),
        ("bz2-flipped.jsonl", lambda p: _written(p, _flipped(bz2.compress(lines), 5)),
         ("Invalid data stream", damaged)),
        ("xz-flipped.jsonl", lambda p: _written(p, _flipped(lzma.compress(lines))),
         ("Corrupt input data", damaged)),
        ("latin1.jsonl", lambda p: _written(p, lines + '{"text": "\xe9"}\n'.encode("latin-1")),
         (":201: malformed JSON", "utf-8")),
        ("broken.jsonl", lambda p: _written(p, lines + b'{"text": \n'),
         (":201: malformed JSON at column",)),
        ("latin1.parquet", _not_utf8_parquet, ("cannot read the parquet file", "not UTF-8")),
        ("damaged.parquet", lambda p: _written(p, b"PAR1" + bytes(100) + b"PAR1"),
         ("cannot read the parquet file", damaged)),
        ("saved", _stateless_datasets_dir, ("no '_data_files'", "save the dataset again")),
    ]


@pytest.mark.parametrize("name, write, words", _damaged_sources(),
                         ids=[case[0] for case in _damaged_sources()])
def test_a_data_source_that_does_not_read_is_one_line_naming_it(tmp_path, capsys, name, write,
                                                                 words):
    """Whatever the failure below (zlib, gzip, bz2, lzma, UTF-8, JSON, pyarrow, a datasets
    state), dataset.py says in one line which file, how far it read and why: no traceback."""
    source = tmp_path / name
    named = write(source)
    assert dataset.main(["--sources", str(source), "--cache-dir", str(tmp_path / "cache"),
                         "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {named}"), err
    assert all(word in err for word in words), err


def test_a_jsonl_source_compressed_with_gzip_bz2_or_xz_reads_as_the_plain_one(tmp_path):
    """The reader goes by the file's first bytes, whatever its name."""
    import bz2
    import gzip
    import lzma

    plain = _written(tmp_path / "plain.jsonl", _code_lines(5))
    want = [raw for _, _, raw in jsonl_lines(plain)]
    for compress, suffix in ((gzip.compress, "gz"), (bz2.compress, "bz2"), (lzma.compress, "xz")):
        packed = _written(tmp_path / f"{compress.__module__}.jsonl", compress(plain.read_bytes()))
        assert [raw for _, _, raw in jsonl_lines(packed)] == want
        named = _written(tmp_path / f"code.jsonl.{suffix}", compress(plain.read_bytes()))
        corpus = load_corpus(cfg(tmp_path, sources=[str(named)], **WHOLE))
        assert len(corpus.train) == 5


def test_a_folder_gives_the_same_ids_and_split_however_its_path_is_spelled(tmp_path,
                                                                            monkeypatch):
    """The cache key knows a folder by its resolved path, so its documents' ids (and the split
    drawn from them) go by that path's name too: ".", "proj/" and the absolute path agree."""
    proj = tmp_path / "proj"
    proj.mkdir()
    for i in range(30):
        (proj / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n")
    ids = []
    for where, spelled in ((proj, "."), (tmp_path, "proj/"), (tmp_path / "..", str(proj))):
        monkeypatch.chdir(where)
        corpus = load_corpus(cfg(tmp_path / f"cache{len(ids)}", sources=[spelled],
                                 extensions=[".py"]))
        ids.append((sorted(d.id for d in corpus.train), sorted(d.id for d in corpus.test)))
    assert ids[0] == ids[1] == ids[2]
    assert all(i.startswith("proj/") for i in ids[0][0])


def test_code_records_read_their_text_column_and_bad_rows_name_file_and_row(tmp_path):
    """Parquet and datasets records are read from text_column, repo and path making their ids; a
    missing column, a row without text or with a non-string one, and a whole DatasetDict are
    errors naming file, row and remedy."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [(EMAIL / name).read_text() for name in ("charset.py", "utils.py", "errors.py")]
    parquet = tmp_path / "code.parquet"
    pq.write_table(pa.table({"content": texts, "repo": ["r1", "r2", "r3"],
                             "path": ["a.py", "b.py", "c.py"]}), parquet)
    corpus = load_corpus(cfg(tmp_path, sources=[str(parquet)], text_column="content",
                             **WHOLE))
    assert sorted(d.id for d in corpus.train) == ["r1/a.py", "r2/b.py", "r3/c.py"]
    with pytest.raises(DataError, match=r"code\.parquet: no column 'text'.*content, repo, path"
                                        r".*text_column"):
        load_corpus(cfg(tmp_path, sources=[str(parquet)], text_column="text"))
    with pytest.raises(DataError, match=r"code\.parquet: row 1: .*none of the keys.*"
                                        r"'content', 'repo', 'path'.*text_column"):
        load_corpus(cfg(tmp_path, sources=[str(parquet)]))
    pq.write_table(pa.table({"text": [texts[0], None, texts[2]]}), parquet)
    with pytest.raises(DataError, match=r"code.parquet: row 2: key 'text' must be a string"):
        load_corpus(cfg(tmp_path, sources=[str(parquet)]))
    corpus = load_corpus(cfg(tmp_path, sources=[str(parquet)], skip_bad=True, **WHOLE))
    assert len(corpus.train) == 2 and corpus.stats["dropped"] == {"bad_record": 1}
    splits = tmp_path / "splits"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts}),
                          "test": datasets.Dataset.from_dict({"text": texts})}
                         ).save_to_disk(str(splits))
    with pytest.raises(DataError, match=r"a datasets DatasetDict \(splits \['test', 'train'\]\); "
                                        r"name one split's directory"):
        load_corpus(cfg(tmp_path, sources=[str(splits)]))
    corpus = load_corpus(cfg(tmp_path, sources=[str(splits / "train")], **WHOLE))
    assert len(corpus.train) == 3
    with pytest.raises(DataError, match="set text_column .* or input_column and output_column"):
        cfg(tmp_path, text_column="a", input_column="b", output_column="c").validate()


def test_a_hugging_face_dataset_id_reads_its_train_split_from_the_hub_cache(tmp_path,
                                                                            offline_hub):
    """`org/name` as a source: the cached snapshot of the dataset repo (offline), its train
    split's parquet files by the hub's file naming, as the same file given directly."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tiny_hf import hub_cache

    repo = tmp_path / "repo" / "data"
    repo.mkdir(parents=True)
    for split, pairs in (("train", REFACTOR_PAIRS[:20]), ("test", REFACTOR_PAIRS[20:])):
        pq.write_table(pa.table({"input": [p["input"] for p in pairs],
                                 "output": [p["output"] for p in pairs]}),
                       repo / f"{split}-00000-of-00001.parquet")
    hub_cache(offline_hub, "org/pairs", tmp_path / "repo", repo_type="dataset")
    corpus = load_corpus(cfg(tmp_path, task="refactor", sources=["org/pairs"], **WHOLE))
    direct = load_corpus(cfg(tmp_path, task="refactor", **WHOLE,
                             sources=[str(repo / "train-00000-of-00001.parquet")]))
    assert sorted(d.target for d in corpus.train) == sorted(d.target for d in direct.train)
    assert len(corpus.train) == 20
    with pytest.raises(DataError, match=r"org/missing: no such directory, and no Hugging Face "
                                        r"snapshot.*--repo-type dataset"):
        load_corpus(cfg(tmp_path, sources=["org/missing"]))


def _hub_dataset(offline_hub, tmp_path: Path, name: str, files: dict[str, str]) -> str:
    """A cached snapshot of dataset repo ``org/name`` holding ``files`` (path: text)."""
    from tiny_hf import hub_cache

    repo = tmp_path / f"repo-{name}"
    for path, text in files.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(text)
    hub_cache(offline_hub, f"org/{name}", repo, repo_type="dataset")
    return f"org/{name}"


def _code_records(*names: str) -> str:
    return "".join(json.dumps({"text": f"def {n}():\n    return 1\n"}) + "\n" for n in names)


def test_a_hub_datasets_train_split_is_found_by_the_hubs_own_file_naming(tmp_path, offline_hub):
    """A hub dataset's train files are those datasets' default split patterns name train
    ("train" or "training" between separators: train_0.jsonl, python-train.jsonl), never
    train_prefs; a snapshot of no parquet or JSONL file, or of other splits alone, is refused
    naming its files and its snapshot."""
    numbered = _hub_dataset(offline_hub, tmp_path, "numbered", {
        "data/train_0.jsonl": _code_records("a", "b"), "data/train_1.jsonl": _code_records("c"),
        "data/test_0.jsonl": _code_records("t")})
    prefixed = _hub_dataset(offline_hub, tmp_path, "prefixed", {
        "data/python-train.jsonl": _code_records("p", "q"),
        "data/python-test.jsonl": _code_records("t")})
    for source, kept in ((numbered, 3), (prefixed, 2)):
        corpus = load_corpus(cfg(tmp_path, sources=[source], min_lines=1, **WHOLE))
        assert len(corpus.train) == kept, source
    prefs = _hub_dataset(offline_hub, tmp_path, "prefs", {
        "data/train_prefs-0.jsonl": _code_records("a"), "data/test_prefs-0.jsonl": _code_records("b")})
    with pytest.raises(DataError, match=r"org/prefs: no split named train .*train_prefs-0.jsonl.*"
                                        r"snapshot, .*snapshots"):
        load_corpus(cfg(tmp_path, sources=[prefs]))
    other = _hub_dataset(offline_hub, tmp_path, "other", {"data/train.json": "[]",
                                                          "data/train.csv": "content\n"})
    with pytest.raises(DataError, match=r"org/other: no parquet or JSONL file .*data/train.csv, "
                                        r"data/train.json.*convert"):
        load_corpus(cfg(tmp_path, sources=[other]))


def test_a_folder_with_a_state_json_of_its_own_is_read_as_code(tmp_path):
    """A datasets save_to_disk directory holds state.json and dataset_info.json; a folder of
    code with a state.json of its own (an app's) is read as code."""
    src = tmp_path / "app"
    src.mkdir()
    (src / "state.json").write_text('{"counter": 3}')
    (src / "main.py").write_text("def main():\n    return 1\n")
    corpus = load_corpus(cfg(tmp_path, sources=[str(src)], min_lines=1, **WHOLE))
    assert [d.id for d in corpus.train] == ["app/main.py"]


def test_one_folder_given_twice_is_refused_as_the_same_folder(tmp_path):
    """A folder given twice, once with a trailing slash, is refused as the same folder: its files
    would otherwise be read twice, the second time dropped as duplicates."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text("def a():\n    return 1\n")
    with pytest.raises(DataError, match=r"src and .*src/ are the same folder: give it once"):
        load_corpus(cfg(tmp_path, sources=[str(src), f"{src}/"]))


def test_the_held_out_sample_prompt_is_in_the_tasks_format(tmp_path):
    """lm: the header and docstring of the first top-level function with one (code that ends
    with the function), else the first function's header; refactor: a pair's prompt (ending with
    the output); completion: code's function header, or a pair's prompt."""
    bare = Doc("b.py", "def main():\n    main()\n")
    doc = Doc("a.py", 'import os\n\n\n@cache\ndef area(r):\n    """Of a circle."""\n'
              "    return 3.14 * r * r\n\n\ndef one(): return 1\n")
    assert held_out_prompt([bare, doc], cfg(tmp_path)) == (
        '@cache\ndef area(r):\n    """Of a circle."""\n', True)
    assert held_out_prompt([bare], cfg(tmp_path)) == ("def main():\n", True)
    pair = Doc("p.jsonl:1", "x = 1\n", target="x = 1  # one\n")
    prompt, code = held_out_prompt([doc, pair], cfg(tmp_path, task="refactor"))
    assert prompt == REFACTOR_TEMPLATE.format(input="x = 1\n") and not code
    assert held_out_prompt([pair], cfg(tmp_path)) is None
    # completion on pairs: the first pair's prompt, its completion ending with the function
    header = Doc("q.jsonl:1", 'def sign(x):\n    """The sign of x."""\n',
                 target="    return (x > 0) - (x < 0)\n")
    assert held_out_prompt([header], cfg(tmp_path, task="completion")) == (
        'def sign(x):\n    """The sign of x."""\n', True)


def test_code_of_another_language_prompts_its_sample_with_a_files_opening(tmp_path):
    """Held-out Kotlin (or any code of a known language but Python) prompts the end-of-run
    sample with a file's lines through its first block's opening brace, a completion of no
    Python function's end; a Python function's header comes first; text that is no code of a
    known language (Markdown, a JSONL record) gives none."""
    kotlin = Doc("okio/Buffer.kt", "package okio\n\nimport java.io.IOException\n\n"
                 "/** A buffer. */\nclass Buffer : BufferedSource {\n  val size = 0L\n}\n")
    opening = ("package okio\n\nimport java.io.IOException\n\n/** A buffer. */\n"
               "class Buffer : BufferedSource {\n")
    assert held_out_prompt([kotlin], cfg(tmp_path)) == (opening, False)
    python = Doc("b.py", "def main():\n    main()\n")
    assert held_out_prompt([kotlin, python], cfg(tmp_path)) == ("def main():\n", True)
    markdown = Doc("notes.md", "# Title {\nwords\n")
    record = Doc("code.jsonl:3", "class A {\n}\n")
    braceless = Doc("run.sh", "#!/bin/sh\necho hi\n")
    assert held_out_prompt([markdown, record, braceless], cfg(tmp_path)) is None


def test_a_docstring_runs_sample_prompt_is_cut_as_training_cuts_it(tmp_path, tok):
    """A docstring task's end-of-run sample prompt is its held-out example's as training and
    eval cut it (the code to docstring_code_tokens, the instruction whole), not the whole
    class, which a model's context would cut from its left, instruction first."""
    from codelm.data.encoding import fitted_prompt
    from codelm.data.examples import examples_for

    data_cfg = cfg(tmp_path, task="docstring", block_size=256, docstring_code_tokens=4,
                   docstring_prompt="verbose", **WHOLE)
    data = prepare(data_cfg, tok)
    prompt = data.sample_prompt.text
    documents = [Doc(f"email/{name}", text) for name, text in email_texts().items()]
    example = next(e for doc in documents for e in examples_for(doc, data_cfg, Counter()))
    assert prompt == fitted_prompt(example, tok) and len(prompt) < len(example.prompt)
    assert prompt.startswith(example.head) and prompt.endswith(example.tail)


def test_a_cut_method_prompt_keeps_its_docstrings_closing_quotes(tok):
    """A long method prompt loses the end of its docstring's text first; the line of its
    closing quotes stays, so the prompt is still a header with a closed docstring that the
    body completes (never code written after an unfinished docstring)."""
    from codelm.data.encoding import tokenize_examples, truncate_pair
    from codelm.data.examples import method_examples

    words = " ".join(f"word{i}" for i in range(300))
    text = (f'def long_doc(x):\n    """{words[:60]}\n\n    {words}\n    """\n'
            "    y = x + 1\n    return y\n")
    [example] = method_examples(Doc("m.py", text))
    assert example.tail == '    """\n'
    cfg = DataConfig(task="method", block_size=64, progress=False, num_workers=1)
    [(prompt, completion, span)] = tokenize_examples([example], tok, cfg, "test")
    kept, _ = truncate_pair(prompt, completion, 64, None, None, span)
    header = tok.decode(kept)
    assert len(kept) < len(prompt) and header.startswith("def long_doc(x):")
    ast.parse(header + "    pass\n")


def test_dataset_py_names_the_training_flags_that_read_its_preparation(tmp_path, capsys, tok):
    """dataset.py says where its preparation is cached and the trainingmanager.py flags that
    prepare the same data; those flags, parsed by trainingmanager, key the same corpus."""
    import shlex

    from codelm import trainconfig
    from codelm.data.splits import corpus_key
    from codelm.training import plan

    argv = ["--sources", str(EMAIL), "--near-dedupe", "--split-by", "file", "--val-frac", "0.2",
            "--test-frac", "0", "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    assert dataset.main(argv) == 0
    err = capsys.readouterr().err
    cached = re.search(r"cached at (\S+)", err).group(1)
    flags = shlex.split(err.split("trainingmanager.py prepares the same: ")[1].splitlines()[0])
    run = plan.parse_config([*flags, "--preset", "tiny", "--max-steps", "1"])
    assert cached.endswith(f"corpus-{corpus_key(trainconfig.data_config(run))}")
    tok.save(tmp_path / "tok")  # with a tokenizer: the task's examples, at its block size
    assert dataset.main([*argv, "--task", "completion", "--tokenizer", str(tmp_path / "tok")]) == 0
    err = capsys.readouterr().err
    cached = re.search(r"cached at (\S+)", err).group(1)
    flags = shlex.split(err.split("trainingmanager.py prepares the same: ")[1].splitlines()[0])
    run = plan.parse_config([*flags, "--preset", "tiny", "--max-steps", "1"])
    context = run.block_size or trainconfig.default_block_size(run)  # as the trainer takes it
    prepared = dataset.prepare(trainconfig.data_config(run, context), tok)
    assert str(prepared.cache_path) == cached and prepared.stats["cache_hit"]


def test_the_training_flags_after_no_use_cache_read_the_rebuilt_entry(tmp_path, capsys, tok):
    """dataset.py --no-use-cache rebuilds the entry and publishes it: the trainingmanager.py
    flags it prints read that entry from the cache (use_cache is not passed on, as a run
    with it would build the same entry again)."""
    import shlex

    from codelm import trainconfig
    from codelm.training import plan

    tok.save(tmp_path / "tok")
    argv = ["--sources", str(EMAIL), "--split-by", "file", "--cache-dir", str(tmp_path / "cache"),
            "--no-progress", "--no-use-cache", "--tokenizer", str(tmp_path / "tok")]
    assert dataset.main(argv) == 0
    err = capsys.readouterr().err
    cached = re.search(r"cached at (\S+)", err).group(1)
    flags = shlex.split(err.split("trainingmanager.py prepares the same: ")[1].splitlines()[0])
    run = plan.parse_config([*flags, "--preset", "tiny", "--max-steps", "1"])
    context = run.block_size or trainconfig.default_block_size(run)
    prepared = dataset.prepare(trainconfig.data_config(run, context), tok)
    assert str(prepared.cache_path) == cached and prepared.stats["cache_hit"]


def test_dataset_py_trains_the_tokenizer_a_run_from_scratch_takes(tmp_path, capsys):
    """--train-tokenizer trains the tokenizer trainingmanager.py's from-scratch run of the same
    data trains, kept where that run reads it (HF tokenizers reads it with the same ids), and
    builds the task's examples with it: the flags it prints give a run that takes both from the
    cache. A --tokenizer-* flag alone, or beside --tokenizer, is a usage error."""
    import shlex

    from tokenizers import Tokenizer

    from codelm import trainconfig
    from codelm.training import build, plan

    argv = ["--sources", str(EMAIL), "--split-by", "file", "--val-frac", "0.2", "--test-frac",
            "0", "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--train-tokenizer",
            "--tokenizer-kind", "bpe", "--tokenizer-max-vocab", "200", "--tokenizer-min-freq", "2"]
    assert dataset.main(argv) == 0
    out, err = capsys.readouterr()
    json.loads(out)  # stdout: the counts alone
    assert "tokenizer: 463 tokens, the bpe tokenizer trained on the train split" in err, err
    kept = Path(re.search(r"tokenizer kept at (\S+)", err).group(1))
    cached = re.search(r"cached at (\S+)", err).group(1)
    flags = shlex.split(err.split("trainingmanager.py prepares the same: ")[1].splitlines()[0])
    assert flags[-4:] == ["--tokenizer-min-freq", "2", "--tokenizer-max-vocab", "200"]
    run = plan.parse_config([*flags, "--preset", "tiny", "--max-steps", "1"])
    tok = build.load_or_train_tokenizer(run, trainconfig.data_config(run))
    assert "from the cache" in capsys.readouterr().out
    text = (EMAIL / "utils.py").read_text("utf-8")
    hf = Tokenizer.from_file(str(kept / "tokenizer.json"))
    assert hf.encode(text).ids == tok.encode(text) and tok.vocab_size == 463
    context = run.block_size or trainconfig.default_block_size(run)
    prepared = dataset.prepare(trainconfig.data_config(run, context), tok)
    assert str(prepared.cache_path) == cached and prepared.stats["cache_hit"]
    assert dataset.main([*argv[:argv.index("--tokenizer-kind")], "--task", "completion"]) == 0
    err = capsys.readouterr().err  # the default tokenizer: its flags are none, the context is
    flags = shlex.split(err.split("trainingmanager.py prepares the same: ")[1].splitlines()[0])
    assert "--block-size" in flags and not any(f.startswith("--tokenizer") for f in flags)
    for bad, message in ((["--tokenizer-kind", "bpe"], "--tokenizer-kind sets the tokenizer "
                                                        "--train-tokenizer trains"),
                         (["--train-tokenizer", "--tokenizer", str(kept)], "give one"),
                         (["--train-tokenizer", "--tokenizer-max-vocab", "0"],
                          "tokenizer_max_vocab (0, --tokenizer-max-vocab): must be >= 1")):
        with pytest.raises(SystemExit):
            dataset.main(bad)
        assert message in capsys.readouterr().err


def test_a_cut_prompt_keeps_its_tail_where_a_token_joins_the_code_and_the_tail():
    """A byte-level BPE of Llama-3's pre-tokenizer reads ")\\n\\n" as one token: a docstring
    prompt cut to fit loses the end of its code, never the newlines before "Docstring:" that
    the token holds; an uncut prompt is the whole text's ids, as the tokenizer reads it."""
    from codelm.data.encoding import tokenize_examples, truncate_pair
    from codelm.tokenization.bpe import BPETokenizer

    texts = [f"x{i} = f(a{i}, b)\n\nDocstring: y\n" for i in range(200)]
    tok = BPETokenizer.train(texts, vocab_size=256 + 120, pretokenizer="llama3")
    assert len(tok.encode(")\n\n")) == 1  # the token the code and the tail share
    code = "".join(f"value{i} = compute(value, {i})\n" for i in range(30)) + "result = f(a, b)"
    example = Example("Class ", "y", body=code, tail="\n\nDocstring:")
    cfg = DataConfig(task="docstring", block_size=1024, progress=False, num_workers=1)
    [(prompt, completion, span)] = tokenize_examples([example], tok, cfg, "test")
    assert prompt == tok.encode(example.prompt)
    kept, _ = truncate_pair(prompt, completion, 40, None, None, span)
    text = tok.decode(kept)
    assert len(kept) < len(prompt) and text.startswith("Class ")
    assert text.endswith(")\n\nDocstring:"), text


def test_dataset_py_builds_a_models_examples_at_the_context_its_run_takes(tmp_path, capsys,
                                                                            tok):
    """--tokenizer naming a model's directory builds the examples at the context a run
    --init-from it takes (its own, at most 1024), said so, unless --block-size is given; the
    run of the printed flags reads the same entry."""
    import shlex

    from tiny_hf import save_tiny_hf

    from codelm import trainconfig
    from codelm.training import plan

    model = tmp_path / "model"
    save_tiny_hf("llama", model, vocab_size=tok.vocab_size, max_position_embeddings=96)
    tok.save(model)
    argv = ["--sources", str(EMAIL), "--split-by", "file", "--val-frac", "0.2", "--test-frac",
            "0", "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--task", "completion",
            "--tokenizer", str(model)]
    assert dataset.main(argv) == 0
    err = capsys.readouterr().err
    assert f"note: block_size 96: the context of {model}" in err
    flags = shlex.split(err.split("trainingmanager.py prepares the same: ")[1].splitlines()[0])
    run = plan.parse_config([*flags, "--init-from", str(model), "--max-steps", "1"])
    assert run.block_size == 96 == trainconfig.default_block_size(run)
    assert dataset.main([*argv, "--block-size", "64"]) == 0
    assert "note: block_size" not in capsys.readouterr().err


def test_checkouts_given_as_directories_are_repositories_as_their_scraped_records_are(
        tmp_path, capsys):
    """A git checkout given as a directory is a repository (its name, as scraping local names
    its records): three of them split by repository, none in two splits; a plain directory and
    the standard library name none and split by file, with no note of a fallback."""
    import shutil

    roots = []
    for name in ("json", "email", "http"):
        shutil.copytree(stdlib_root() / name, tmp_path / "repos" / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
        (tmp_path / "repos" / name / ".git").mkdir()
        roots.append(str(tmp_path / "repos" / name))
    corpus = load_corpus(cfg(tmp_path, sources=roots))
    assert corpus.stats["split_by"] == "repo" and corpus.stats["repositories"] == 3
    held = {s: {d.id.split("/")[0] for d in getattr(corpus, s)} for s in ("train", "val", "test")}
    assert all(len(names) == 1 for names in held.values())
    assert set().union(*held.values()) == {"json", "email", "http"}
    for root in roots:
        shutil.rmtree(Path(root) / ".git")
    plain = load_corpus(cfg(tmp_path, sources=roots))
    assert plain.stats["split_by"] == "file" and plain.stats["repositories"] == 0
    assert dataset.main(["--max-docs", "30", "--cache-dir", str(tmp_path / "cache"),
                         "--no-progress"]) == 0
    assert "split by file" not in capsys.readouterr().err
