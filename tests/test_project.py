"""Project-level completion: the context composers, Long Code Arena's line categories on a git
history, the project-completion evaluation task, and the project training task."""

from __future__ import annotations

import json
import random
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from codelm.data import composers as comp
from codelm.data import history
from tokenizer import CODE_SPECIAL_TOKENS, CodeTokenizer

UTIL = '''def helper(x):
    return x * 2


class Base:
    def get(self, key):
        return key
'''
EXTRA = '''def fresh_api():
    return 41  # MARKER_COMMITTED
'''
# The completion file, each line's LCA category by hand (its first line has no prefix: none).
CORE = [
    ('"""Core of the package."""', None),
    ("from pkg.util import helper", "inproject"),  # helper: declared in the snapshot
    ("import os", "non_informative"),  # an import
    ("", None),
    ("", None),
    ("def local_fn(y):", "random"),  # its own name does not count; y is declared nowhere
    ("    return helper(y) + 1", "inproject"),
    ("", None),
    ("", None),
    ("class Thing(Base):", "inproject"),  # Base: the snapshot's
    ("    def run(self):", "random"),  # run is common, but this line declares it
    ("        total = fresh_api() + helper(1)", "committed"),  # committed wins over inproject
    ("        value = local_fn(total)", "infile"),  # local_fn: declared in this file
    ("        # a comment on the value", "non_informative"),
    ("        counter = len(os.sep) * 2", "random"),
    ("        self.update(value, counter)", "common"),  # update: LCA's common name
    ("        pass", "non_informative"),  # shorter than 5 characters
    ("        return self.get(value)  # MARKER_FUTURE", "inproject"),  # get: Base.get
]
CORE_TEXT = "\n".join(line for line, _ in CORE) + "\n"


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def _commit(repo: Path, files: dict[str, str], message: str) -> None:
    for path, text in files.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(text)
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", message)


@pytest.fixture
def repo(tmp_path) -> Path:
    """A history: the package's start; a commit adding core.py (the completion file) and
    extra.py; a later commit whose file and change must never reach a context."""
    root = tmp_path / "proj"
    root.mkdir()
    _git(root, "init", "-q")
    _commit(root, {"pkg/util.py": UTIL, "pkg/__init__.py": 'print("hi")\n',
                   "docs/notes.md": "helper doubles its argument\n"}, "start")
    _commit(root, {"pkg/core.py": CORE_TEXT, "pkg/extra.py": EXTRA}, "core")
    _commit(root, {"pkg/later.py": "SECRET = 'MARKER_LATER'\n",
                   "pkg/util.py": UTIL + "# MARKER_LATER_EDIT\n"}, "later")
    return root


def _functions(name: str) -> str:
    """A file of ten functions of its own: no other file's copy."""
    return "".join(f"def {name}_{i}(x):\n    return {name}_step(x, {i})\n" for i in range(10))


def _core_case(repo: Path, per_category: int = 100) -> history.CompletionCase:
    cases = history.completion_cases(repo, [".py"], 10, per_category, 0, min_lines=10)
    (case,) = [c for c in cases if c.path == "pkg/core.py"]
    return case


def test_line_categories_are_long_code_arenas_on_hand_written_lines(repo):
    """Every category present, each line where LCA's definitions put it: committed before
    inproject before infile before common, then non-informative, the rest random."""
    case = _core_case(repo)
    expected: dict[str, list[int]] = {name: [] for name in history.CATEGORIES}
    for number, (_, category) in enumerate(CORE):
        if category is not None:
            expected[category].append(number)
    assert case.lines == expected
    assert all(case.lines[name] for name in history.CATEGORIES)
    assert sorted(case.snapshot) == ["docs/notes.md", "pkg/__init__.py", "pkg/util.py"]
    assert case.snapshot["pkg/util.py"] == UTIL  # the parent's, not the later edit
    assert sorted(case.committed) == ["pkg/extra.py"]


def test_prose_and_keywords_declare_no_name():
    """A README's words ("type is", "function for") declare nothing, and no keyword is a name
    even where the keyword pattern reads a file that does not parse: a line of keywords is
    random, not inproject."""
    prose = "The return type is a dict. Each object in the list is a helper function for parsing."
    snapshot = {"README.md": prose, "old.py": "def broken(:\n  type is  # class in\n"}
    text = "import os\n\ndef f(x):\n    if x is None:\n        return x in [1, 2]\n"
    lines = history.line_categories(text, "pkg/f.py", snapshot, {})
    assert lines["inproject"] == [] and lines["random"] == [2, 3, 4]
    assert history.declared_names(prose, "README.md") == frozenset()
    # where the keyword pattern reads a file (Python 2, Kotlin), its strings and comments do
    # not declare either: only its code does
    python2 = 'print "the type name of the object instance"\ndef describe(value):\n    pass\n'
    kotlin = ("/** Wraps an object result.\n * @return the type value */\n"
              'fun wrap(x: Int) = "a class name"\n// an object note\n')
    assert history.declared_names(python2, "old.py") == {"describe"}
    assert history.declared_names(kotlin, "Wrap.kt") == {"wrap"}


def test_kotlin_and_go_declarations_and_lines_are_categorised_as_pythons_are():
    """A Kotlin extension declares its function, not its receiver's type (`fun Int.isEven`:
    isEven, not Int), generic ones past their type parameters, `enum class`/`fun interface`
    their name; a Go method past its receiver. Their prints, packages and block-comment lines
    are non-informative, as Python's are; `*a, b = xs` in Python is code."""
    kotlin = ("class Box<T>(val v: T)\nfun <T> Box<T>.unwrap(): T = v\n"
              "fun Int.isEven() = this % 2 == 0\nenum class Mode { A, B }\n"
              "fun interface Validator { fun check(): Boolean }\nfun String?.slug() = this\n")
    assert history.declared_names(kotlin, "Box.kt") == {
        "Box", "unwrap", "isEven", "Mode", "Validator", "check", "slug"}
    go = "type Repo struct{}\nfunc (r *Repo) Add(x int) int { return x }\nfunc New() *Repo {}\n"
    assert history.declared_names(go, "repo.go") == {"Repo", "Add", "New"}
    text = ("package app\n\nfun render(handle: String, n: Int): String {\n"
            "    println(\"rendering $handle\")\n    val slug = handle.slug()\n"
            "    /**\n     * The even ones.\n     */\n    return n.isEven().toString()\n}\n")
    lines = history.line_categories(text, "app/Render.kt", {"Box.kt": kotlin}, {})
    assert lines["inproject"] == [4, 8]  # slug(), isEven(); not "String" or "Int"
    assert lines["non_informative"] == [3, 5, 6, 7, 9]  # println, /**, *, */, }
    assert lines["random"] == [2]
    assert not history.non_informative("*head, tail = items", "f.py")
    assert not history.non_informative("*out = value + offset;", "buf.go")  # a pointer's
    assert history.declared_names("fun <T : Comparable<T>> List<T>.top(): T = max()\n",
                                  "Top.kt") == {"top"}
    assert history.declared_names("fun Map<String, Map<String, List<Int>>>.deep() = 1\n",
                                  "Deep.kt") == {"deep"}
    continued = "val total = base\n    * factor + offset\nval next = total\n"
    assert history.line_categories(continued, "T.kt", {}, {})["random"] == [1, 2]
    # a string template's code is code: its names count (the template's text does not)
    templated = ('package app\n\nfun show(n: Int): String {\n'
                 '    val label = "even: ${n.isEven()} of $n"\n    return "slug Box"\n}\n')
    lines = history.line_categories(templated, "app/Show.kt", {"Box.kt": kotlin}, {})
    assert lines["inproject"] == [3] and 4 not in lines["inproject"]


def test_methods_without_a_keyword_are_declared_in_c_family_languages():
    """Java's, C#'s, C's, C++'s and TypeScript's methods and functions have no keyword: each is
    found by its return type (or its body's brace), so a call to a project's method is
    inproject, as a Python one is; control statements, calls and `new X(...) {` declare
    nothing, and a declaration's own line does not name it."""
    java = ("package app;\n\npublic class Repository {\n"
            "    public Repository(String name) {\n        super(name);\n    }\n"
            "    @Override\n"
            "    public static <T> List<T> sortRows(List<T> rows, Comparator<T> cmp) "
            "throws IOException {\n"
            "        if (rows.isEmpty()) {\n            return rows;\n        }\n"
            "        new Thread(runner) {\n        };\n        return rows;\n    }\n"
            "    int countRows(String table)\n    {\n        return 0;\n    }\n"
            "    void saveEntity(Entity entity) { store(entity); }\n}\n")
    assert history.declared_names(java, "Repository.java") == {
        "Repository", "sortRows", "countRows", "saveEntity"}
    c = ("static int count_rows(const char *name)\n{\n    while (1) { break; }\n"
         "    return strlen(name);\n}\nunsigned long hash_of(const char *s) { return 0; }\n")
    assert history.declared_names(c, "rows.c") == {"count_rows", "hash_of"}
    cpp = "std::vector<int> Repo::load(const std::string& name) const {\n    return {};\n}\n"
    assert history.declared_names(cpp, "repo.cpp") == {"load"}
    cs = "public async Task<int> CountRowsAsync(string table)\n{\n    return 0;\n}\n"
    assert history.declared_names(cs, "Repo.cs") == {"CountRowsAsync"}
    ts = ("export class Store {\n  async saveAll(items: Item[]): Promise<void> {\n"
          "    doThing(items)\n  }\n  get<T>(key: string): T {\n    return x\n  }\n}\n"
          "describe(\"store\", () => {\n  run(x)\n})\n")
    assert history.declared_names(ts, "store.ts") == {"Store", "saveAll", "get"}
    generic = ("class Cache {\n  public T Get<T>(string key) {\n    return default;\n  }\n"
               "  public int Area(int w) => w * w;\n  void Pin() {\n"
               "    fixed (byte* p = bytes) {\n    }\n  }\n}\n")
    assert history.declared_names(generic, "Cache.cs") == {"Cache", "Get", "Area", "Pin"}
    assert history.declared_names("int square(int x) => x * x;\n", "m.dart") == {"square"}
    # Groovy is not read so: `retry(3) {` is a call with a closure, `println render(t)` a call
    groovy = "class Job {\n    def run() {\n        retry(3) {\n            go()\n        }\n" \
             "        println render(template)\n    }\n}\n"
    assert history.declared_names(groovy, "Job.groovy") == {"Job", "run"}
    user = ("package app;\n\nclass Service {\n    void handle(Entity entity) {\n"
            "        Repository repo = Repository.open(\"main\");\n"
            "        repo.saveEntity(entity);\n        int total = repo.countRows(\"users\");\n"
            "        int twice = total * 2 + entity.size();\n    }\n}\n")
    lines = history.line_categories(user, "app/Service.java", {"Repository.java": java}, {})
    assert lines["inproject"] == [4, 5, 6]
    assert lines["random"] == [2, 3, 7]  # class Service, handle(...): declared on their line


def test_a_docstrings_lines_are_non_informative_as_a_block_comments_are():
    """The prose of a Python docstring and of a Kotlin KDoc falls in one category: a line wholly
    inside a string or a comment is non-informative; the code after it is not."""
    python = ('def scale(value):\n    """Scale a measured value by the configured factor.\n\n'
              '    The factor comes from the settings module and is applied once.\n    """\n'
              '    return value * factor_of(value)\n')
    kotlin = ('fun scale(value: Int): Int {\n    /**\n     * Scale a measured value by the '
              'configured factor.\n     *\n     * The factor comes from the settings module and '
              'is applied once.\n     */\n    return value * factorOf(value)\n}\n')
    py_lines = history.line_categories(python, "m.py", {}, {})
    kt_lines = history.line_categories(kotlin, "M.kt", {}, {})
    assert py_lines["non_informative"] == [1, 3, 4] and py_lines["random"] == [5]
    assert kt_lines["non_informative"] == [1, 2, 3, 4, 5, 7] and kt_lines["random"] == [6]


def test_a_moved_or_copied_file_is_no_case_and_odd_paths_are_read(tmp_path):
    """A file moved and edited (a rename, whatever diff.renames says) or copied whole is in
    its parent's snapshot already: no case. A file whose name has a quote or a tab is one."""
    root = tmp_path / "moves"
    root.mkdir()
    _git(root, "init", "-q")
    _git(root, "config", "diff.renames", "false")
    body = "".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(8))
    _commit(root, {"pkg/old.py": body}, "start")
    _git(root, "mv", "pkg/old.py", "pkg/new.py")
    _commit(root, {"pkg/new.py": body + "# edited\n"}, "move")
    _commit(root, {"pkg/copy.py": body + "# edited\n",
                   'pkg/we"ird.py': _functions("weird"),
                   "pkg/tab\tname.py": _functions("tab")}, "copy")
    cases = history.completion_cases(root, [".py"], 10, 2, 0, min_lines=10)
    assert sorted(case.path for case in cases) == ["pkg/tab\tname.py", 'pkg/we"ird.py']


def test_a_file_copied_from_an_unchanged_file_and_edited_is_no_case(tmp_path):
    """A commit copies a file it leaves as it is and edits the copy (git finds copies only of
    the files a commit changes): the parent's snapshot holds most of its answer, so it is no
    case; a new file of the same commit is one."""
    root = tmp_path / "copies"
    root.mkdir()
    _git(root, "init", "-q")
    views = "".join(f"def view_{i}(request):\n    return render(request, 'page_{i}.html')\n"
                    for i in range(10))
    _commit(root, {"app/views.py": views}, "start")
    edited = views.replace("view_3", "admin_view_3").replace("page_7", "admin_7")
    fresh = "".join(f"def handler_{i}(event):\n    return dispatch(event, {i} * {i})\n"
                    for i in range(10))
    _commit(root, {"app/admin_views.py": edited, "app/handlers.py": fresh}, "copy")
    cases = history.completion_cases(root, [".py"], 10, 2, 0, min_lines=10)
    assert [case.path for case in cases] == ["app/handlers.py"]
    parent = {"app/views.py": views}
    unchanged = parent.get
    assert history.copied_from(edited, "app/admin_views.py", parent, unchanged) == "app/views.py"
    assert history.copied_from(fresh, "app/handlers.py", parent, unchanged) is None
    # a new file sharing its licence header and imports with another is no copy of it, nor is a
    # new test sharing its setUp and asserts with an old one (they stay there); functions the
    # commit moves out of a large module into a new file are
    header = "".join(f"# Licensed under the Apache License, line {i} of the notice\n"
                     for i in range(8)) + "import os\nimport sys\n"
    small = header + "".join(f"def price_{i}(item):\n    return item.cost * {i}\n"
                             for i in range(3))
    with_header = {"app/views.py": header + views}
    assert history.copied_from(small, "app/prices.py", with_header, with_header.get) is None
    first, rest = views.split("def view_3")
    moved = header + first
    assert history.copied_from(moved, "app/first.py", parent,
                               {"app/views.py": "def view_3" + rest}.get) == "app/views.py"
    # three of the ten views copied whole, the module left as it is: a part of it
    assert history.copied_from(moved, "app/first.py", parent, unchanged) == "app/views.py"
    setup = ("    def setUp(self):\n        self.user = make_user('alice')\n"
             "        self.client.force_login(self.user)\n")
    old_test = ("class UserTests(TestCase):\n" + setup + "".join(
        f"    def test_{n}(self):\n        response = self.client.get('/{n}')\n"
        "        self.assertEqual(response.status_code, 200)\n" for n in range(8)))
    new_test = ("class OrderTests(TestCase):\n" + setup + "    def test_orders(self):\n"
                "        response = self.client.get('/orders')\n"
                "        self.assertEqual(response.status_code, 200)\n")
    tests = {"tests/test_users.py": old_test}
    assert history.copied_from(new_test, "tests/test_orders.py", tests, tests.get) is None


def test_a_text_added_again_or_on_two_branches_is_one_case_the_newest(tmp_path):
    """A file removed and added again as it was, and a file two branches add alike, are each
    one case (the newest commit's): its lines are scored once."""
    root = tmp_path / "again"
    root.mkdir()
    _git(root, "init", "-q", "-b", "main")
    _commit(root, {"pkg/base.py": _functions("base")}, "start")
    _commit(root, {"pkg/tool.py": _functions("tool")}, "add tool")
    _git(root, "rm", "-q", "pkg/tool.py")
    _commit(root, {}, "remove tool")
    _commit(root, {"pkg/tool.py": _functions("tool")}, "add tool again")
    _git(root, "checkout", "-q", "-b", "side")
    _commit(root, {"pkg/shared.py": _functions("shared")}, "shared on side")
    _git(root, "checkout", "-q", "main")
    _commit(root, {"pkg/shared.py": _functions("shared"), "pkg/own.py": _functions("own")},
            "shared on main")
    _git(root, "-c", "user.name=t", "-c", "user.email=t@t", "merge", "-q", "--no-edit", "side")
    cases = history.completion_cases(root, [".py"], 10, 2, 0, min_lines=10)
    assert sorted(case.path for case in cases) == ["pkg/own.py", "pkg/shared.py", "pkg/tool.py"]
    log = subprocess.run(["git", "-C", str(root), "log", "--format=%H %s"], check=True,
                         capture_output=True, text=True).stdout
    subjects = dict(line.split(" ", 1) for line in log.splitlines())
    (tool,) = [case for case in cases if case.path == "pkg/tool.py"]
    assert subjects[tool.commit] == "add tool again"


def test_a_file_moved_off_a_name_that_gets_a_new_file_is_no_case(tmp_path):
    """One commit moves (and edits) pkg/config.py to pkg/legacy.py and writes a new
    pkg/config.py: git sees a change of config.py, not a rename, so legacy.py is found as a
    copy of it, not an added file whose parent snapshot holds its whole text."""
    root = tmp_path / "moves"
    root.mkdir()
    _git(root, "init", "-q")
    body = "".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(10))
    _commit(root, {"pkg/config.py": body}, "start")
    _commit(root, {"pkg/legacy.py": body + "# kept\n",
                   "pkg/config.py": "".join(f"V{i} = {i}\n" for i in range(12)),
                   "pkg/fresh.py": _functions("fresh")}, "move")
    cases = history.completion_cases(root, [".py"], 10, 2, 0, min_lines=10)
    assert [case.path for case in cases] == ["pkg/fresh.py"]


def test_a_path_that_is_not_utf8_is_left_out_and_the_rest_evaluated(tmp_path, monkeypatch):
    """A file whose name is not UTF-8 is no case and in no snapshot (its name could be neither
    prompted nor saved); a repository given as ~/DIR is read and recorded where it is."""
    import os
    from types import SimpleNamespace

    from codelm.evaluation.tasks.project import load_repositories

    root = tmp_path / "latin1"
    root.mkdir()
    _git(root, "init", "-q")
    body = "".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(8))
    _commit(root, {"pkg/base.py": body}, "start")
    with open(os.path.join(bytes(root), b"pkg/caf\xe9.py"), "w") as f:
        f.write(_functions("cafe"))
    _commit(root, {"pkg/other.py": _functions("other")}, "add")
    _commit(root, {"pkg/last.py": _functions("last")}, "last")
    cases = history.completion_cases(root, [".py"], 10, 2, 0, min_lines=10)
    assert [case.path for case in cases] == ["pkg/last.py", "pkg/other.py"]
    assert sorted(cases[0].snapshot) == ["pkg/base.py", "pkg/other.py"]
    monkeypatch.setenv("HOME", str(tmp_path))
    settings = SimpleNamespace(data=["~/latin1"], limit=None, lines_per_file=2, seed=0,
                               data_options={"extensions": [".py"]})
    records = load_repositories(settings)
    assert {r["repo_dir"] for r in records} == {str(root.resolve())}


def test_lines_are_drawn_per_category_with_the_seed(repo):
    """At most N lines of each category, the same draw for the same seed."""
    first = _core_case(repo, per_category=1)
    again = _core_case(repo, per_category=1)
    assert first.lines == again.lines
    assert all(len(lines) == 1 for lines in first.lines.values())


def test_a_directory_without_git_and_a_history_without_adding_commits_are_one_line(tmp_path):
    """Neither is a history to read; nor is a directory inside a repository (its whole
    history is not that directory's): each a one-line error."""
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(ValueError, match="not a git repository"):
        history.completion_cases(plain, [".py"], 5, 1, 0)
    one = tmp_path / "one"
    one.mkdir()
    _git(one, "init", "-q")
    body = "".join(f"def handler_{i}(request):\n    return respond(request, {i})\n" for i in range(8))
    _commit(one, {"a.py": body}, "root only")  # a root commit has no parent
    with pytest.raises(ValueError, match="no commit adds a file") as caught:
        history.completion_cases(one, [".py"], 5, 1, 0)
    assert "\n" not in str(caught.value) and "copy" not in str(caught.value)
    # files a commit adds that copy the parent's (templated snippets): counted in the error
    _commit(one, {"b.py": body, "c.py": body.replace("respond", "reply", 1)}, "copies")
    with pytest.raises(ValueError, match=r"1 adding commits read; 2 such file\(s\) copy one "
                                         r"the parent holds"):
        history.completion_cases(one, [".py"], 5, 1, 0)
    (one / "sub").mkdir()
    with pytest.raises(ValueError, match=r"inside the git repository .*one.* give that") as caught:
        history.completion_cases(one / "sub", [".py"], 5, 1, 0)
    assert "\n" not in str(caught.value)


def test_a_bare_clone_is_a_history_to_read(repo, tmp_path):
    """A bare clone (a mirror: no work tree) gives the cases its repository gives; a folder
    inside a git directory (a bare one's, or a work tree's .git) is refused, naming the
    repository to give."""
    bare = tmp_path / "proj.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(repo), str(bare)], check=True)
    ids = [case.id.split("@", 1)[1] for case in history.completion_cases(repo, [".py"], 10, 1, 0)]
    assert [case.id.split("@", 1)[1]
            for case in history.completion_cases(bare, [".py"], 10, 1, 0)] == ids
    for inside, repository in [(bare / "refs", bare), (repo / ".git", repo),
                               (repo / ".git" / "refs", repo)]:
        named = re.escape(f"inside the git repository {repository.resolve()},")
        with pytest.raises(ValueError, match=named):
            history.completion_cases(inside, [".py"], 10, 1, 0)


# ---- Composers ----------------------------------------------------------------------------------

def _tokenizer(*extra: str) -> CodeTokenizer:
    texts = [UTIL, EXTRA, CORE_TEXT]
    return CodeTokenizer.train(texts, min_freq=1, special_tokens=CODE_SPECIAL_TOKENS + extra)


def test_path_distance_is_lcas():
    """LCA's distance: up from the first path's directory to the shared one, down to the
    other file."""
    assert comp.path_distance("a/b/c.py", "a/b/d.py") == 0
    assert comp.path_distance("a/b/c.py", "a/e.py") == 1
    assert comp.path_distance("a/e.py", "a/b/c.py") == 1
    assert comp.path_distance("a/b/c.py", "x/y/z.py") == 4
    assert comp.path_distance("c.py", "d.py") == 0


def test_bm25_scores_equal_bm25s_lucene():
    """The index's BM25 equals bm25s' Lucene BM25 at Lucene's defaults (k1 1.2, b 0.75) on
    random documents; files without a term (empty __init__.py files) are no documents to
    Lucene (its docCount and average length leave them out) and score 0."""
    import bm25s

    assert (comp.BM25_K1, comp.BM25_B) == (1.2, 0.75)  # Lucene's BM25Similarity()
    rng = random.Random(0)
    words = [f"w{i}" for i in range(40)]
    docs = [[rng.choice(words) for _ in range(rng.randint(1, 60))] for _ in range(50)]
    files = {f"f{i}.py": " ".join(doc) for i, doc in enumerate(docs)}
    files |= {f"pkg{i}/__init__.py": "" for i in range(8)}
    index = comp.RepositoryIndex("r", files, _tokenizer())
    with_terms = [i for i, path in enumerate(index.paths) if files[path]]
    reference = bm25s.BM25(method="lucene", k1=comp.BM25_K1, b=comp.BM25_B)
    reference.index([files[index.paths[i]].split() for i in with_terms], show_progress=False)
    for _ in range(5):
        query = [rng.choice(words) for _ in range(rng.randint(1, 8))]
        ours = index.bm25_scores(query)
        assert ours[with_terms] == pytest.approx(reference.get_scores(query), rel=1e-5,
                                                 abs=1e-6)
        assert not ours[[i for i in range(len(files)) if i not in with_terms]].any()


def test_composers_rank_the_files_each_says_and_never_the_completion_file():
    """Each composer orders the repository's files by its own measure (none, path distance, the
    prefix's imports, BM25), and none puts in the file being completed: it would leak the
    answer."""
    files = {"pkg/core.py": "old", "pkg/models.py": "class Model: pass\n",
             "pkg/sub/deep.py": "def unrelated(): pass\n", "other/io.py": "def reader(): pass\n",
             "pkg/views.py": "def render(model): pass\n"}
    index = comp.RepositoryIndex("r", files, _tokenizer())
    prefix = "from other.io import reader\nimport pkg.sub.deep\nx = render(Model())\n"
    ranked = {name: [index.paths[i] for i in rank(index, "pkg/core.py", prefix)]
              for name, rank in comp.COMPOSERS.items()}
    assert ranked["empty"] == []
    assert ranked["path_distance"] == ["pkg/models.py", "pkg/views.py", "pkg/sub/deep.py",
                                       "other/io.py"]
    assert ranked["imports"] == ["other/io.py", "pkg/sub/deep.py", "pkg/models.py",
                                 "pkg/views.py"]
    # bm25: Model matches the shorter file best, render the longer; the rest by path distance
    assert [index.paths[i] for i in comp.rank_bm25(index, "pkg/core.py", "x = render(Model())")
            ] == ["pkg/models.py", "pkg/views.py", "pkg/sub/deep.py", "other/io.py"]
    assert all("pkg/core.py" not in order for order in ranked.values())


def test_kotlin_and_java_imports_rank_the_files_declaring_what_they_import():
    """Kotlin's and Java's imports name a package's declarations, not files: a class by its
    file or the file declaring it, a top-level function or property by the file declaring it,
    a wildcard by every file of its package, a member by its class's file, an alias by what
    it names; names outside the repository (the standard library's) match nothing."""
    files = {
        "app/src/main/kotlin/com/acme/App.kt": "old",
        "app/src/main/kotlin/com/acme/model/User.kt": (
            "package com.acme.model\n\n@Serializable\ndata class User(val name: String)\n"),
        "app/src/main/kotlin/com/acme/model/Order.kt": "package com.acme.model\nclass Order\n",
        "app/src/main/kotlin/com/acme/util/Strings.kt": (
            "package com.acme.util\n\nfun String.slug(): String = lowercase()\n"
            "internal val separator = \"-\"\n"),
        "app/src/main/kotlin/com/acme/db/Repo.kt": (
            "package com.acme.db\n\ninterface Repo {\n    fun save()\n}\n"
            "object Tables {\n    const val USERS = \"users\"\n}\n"),
        "lib/src/main/java/org/acme/Codec.java": (
            "package org.acme;\n\npublic final class Codec {\n  public static int encode() "
            "{ return 1; }\n}\n"),
        "app/src/main/kotlin/com/acme/Other.kt": "package com.acme\nclass Other\n",
    }
    index = comp.RepositoryIndex("r", files, _tokenizer())
    prefix = ("package com.acme\n\nimport com.acme.util.slug\nimport com.acme.db.Tables.USERS\n"
              "import org.acme.Codec as C\nimport com.acme.model.*\nimport kotlin.math.max\n")
    ranked = [index.paths[i] for i in comp.rank_imports(index, "app/src/main/kotlin/com/acme/App.kt",
                                                        prefix)]
    assert ranked[:5] == ["app/src/main/kotlin/com/acme/util/Strings.kt",
                          "app/src/main/kotlin/com/acme/db/Repo.kt",
                          "lib/src/main/java/org/acme/Codec.java",
                          "app/src/main/kotlin/com/acme/model/Order.kt",
                          "app/src/main/kotlin/com/acme/model/User.kt"]
    assert ranked[5] == "app/src/main/kotlin/com/acme/Other.kt"  # then its directory's
    mixed = {"backend/app.py": "old", "backend/models.py": "class User: pass\n",
             "android/models/User.kt": "package models\nclass User\n"}
    mixed_index = comp.RepositoryIndex("r", mixed, _tokenizer())
    order = comp.rank_imports(mixed_index, "backend/app.py", "from models import User\n")
    assert mixed_index.paths[order[0]] == "backend/models.py"  # each language its own names
    java = "package org.acme.web;\nimport static org.acme.Codec.encode;\nimport org.acme.*;\n"
    assert comp.jvm_imports(java) == ["org.acme.Codec.encode", "org.acme"]
    commented = "import com.acme.util.Greeter // greets\nimport com.acme.A /* a */\n"
    assert comp.jvm_imports(commented) == ["com.acme.util.Greeter", "com.acme.A"]
    util = ("package com.acme.util\n\nfun interface Action {\n    fun run()\n}\n"
            "fun <K, V> Map<K, List<V>>.flat(): List<V> = values.flatten()\n")
    assert comp._jvm_names("Util.kt", util) == ["com.acme.util", "com.acme.util.Util",
                                                "com.acme.util.Action", "com.acme.util.flat"]


def test_kotlin_imports_are_read_whatever_the_files_line_endings():
    """A Kotlin import ends at its line's end, LF or CRLF alike (a file written on Windows):
    the imports composer reads the same names, and ranks the same file first, in either."""
    prefix = "package com.acme\n\nimport com.acme.util.Strings\nimport com.acme.db.Repo\n"
    crlf = prefix.replace("\n", "\r\n")
    assert comp.jvm_imports(crlf) == comp.jvm_imports(prefix) == [
        "com.acme.util.Strings", "com.acme.db.Repo"]
    files = {"app/App.kt": "old", "app/Near.kt": "package com.acme\nclass Near\n",
             "lib/util/Strings.kt": "package com.acme.util\r\n\r\nclass Strings\r\n"}
    index = comp.RepositoryIndex("r", files, _tokenizer())
    ranked = comp.rank_imports(index, "app/App.kt", crlf)
    assert index.paths[ranked[0]] == "lib/util/Strings.kt"


def test_relative_imports_resolve_against_the_completion_files_package():
    """Relative imports resolve against the completed file's package (. is x.y, .. is x), as Python
    resolves them, so the imports composer finds the files they name."""
    assert comp.imported_modules("from . import a\nfrom ..b import c\n", "x/y/m.py") == [
        "x.y", "x.y.a", "x.b", "x.b.c"]


def test_an_aliased_import_names_the_module_not_its_alias():
    """``import a.b as c`` imports a.b: the alias is no module name, for a plain import as for
    a from-import, so the imports composer finds the aliased module's file."""
    assert comp.imported_modules("import pkg.util as u, os\n", "app/main.py") == [
        "pkg.util", "os"]
    assert comp.imported_modules("from pkg import util as u\n", "app/main.py") == [
        "pkg", "pkg.util"]
    files = {"app/main.py": "old", "app/near.py": "", "pkg/util.py": UTIL}
    index = comp.RepositoryIndex("r", files, _tokenizer())
    ranked = comp.rank_imports(index, "app/main.py", "import pkg.util as u\n")
    assert index.paths[ranked[0]] == "pkg/util.py"


def test_a_parenthesized_import_over_several_lines_names_each_module():
    """Black's form of a long import: every name of the list (its comments left out), and a
    prefix that ends inside the list names those before its end."""
    prefix = "from app.core import (\n    config,  # settings\n    security as sec,\n)\n"
    assert comp.imported_modules(prefix, "app/main.py") == [
        "app.core", "app.core.config", "app.core.security"]
    assert comp.imported_modules("from app.core import (\n    config,\n", "app/main.py") == [
        "app.core", "app.core.config"]


def test_the_imports_composer_ranks_the_files_outside_its_directory_by_path_distance():
    """Past the imported files and those of the completion file's directory, the imports
    composer takes the nearest files first, a tie in the paths' order."""
    files = {"a/b/m.py": "old", "a/b/n.py": "", "a/c/d/e.py": "", "a/x.py": "", "z.py": "",
             "q.py": ""}
    index = comp.RepositoryIndex("r", files, _tokenizer())
    ranked = [index.paths[i] for i in comp.rank_imports(index, "a/b/m.py", "x = 1\n")]
    assert ranked == ["a/b/n.py", "a/x.py", "q.py", "z.py", "a/c/d/e.py"]


def test_a_package_is_imported_by_its_directorys_name():
    """A package's __init__.py answers to its directory's dotted name (and each shorter tail),
    as Python imports it, so ``import pkg`` ranks pkg/__init__.py first."""
    assert comp._module_names("src/pkg/__init__.py") == ["src.pkg", "pkg"]
    assert comp._module_names("src/pkg/mod.py") == ["src.pkg.mod", "pkg.mod", "mod"]
    files = {"app/main.py": "old", "app/near.py": "", "pkg/__init__.py": "X = 1\n",
             "pkg/other.py": ""}
    index = comp.RepositoryIndex("r", files, _tokenizer())
    ranked = comp.rank_imports(index, "app/main.py", "import pkg\n")
    assert index.paths[ranked[0]] == "pkg/__init__.py"


def test_keywords_are_no_bm25_terms():
    """BM25 matches on identifiers: a language keyword shared by every file says nothing of
    relevance, so a keyword-only prefix matches no file and the files follow by path
    distance."""
    assert comp.identifiers("def f(self): return None if x else y") == ["f", "self", "x", "y"]
    # soft keywords are names too, on every Python version
    assert comp.identifiers("match = re.match(p, type(s)); case _") == [
        "match", "re", "match", "p", "type", "s", "case", "_"]
    files = {"pkg/core.py": "old", "pkg/near.py": "x = 1\n",
             "far/away.py": "def g():\n    return None if True else False\n"}
    index = comp.RepositoryIndex("r", files, _tokenizer())
    assert not index.bm25_scores(comp.identifiers("return None")).any()
    ranked = comp.rank_bm25(index, "pkg/core.py", "return None")
    assert [index.paths[i] for i in ranked] == ["pkg/near.py", "far/away.py"]


@pytest.mark.parametrize("repo, sep, after", [("<repo_name>", "<file_sep>", ""),
                                               ("<|repo_name|>", "<|file_sep|>", "\n")])
def test_compose_writes_the_familys_repository_format_most_relevant_file_last(repo, sep, after):
    """With <repo_name>/<file_sep>, StarCoder2's layout; with <|repo_name|>/<|file_sep|>,
    Qwen2.5-Coder's, a newline after the repository's name and after a file's code where the
    code lacks one: text for text, the most relevant file nearest the prefix, the whole prompt
    within the budget."""
    tok = _tokenizer(repo, sep)
    files = {"pkg/util.py": UTIL, "docs/notes.md": "notes"}
    index = comp.RepositoryIndex("proj", files, tok)
    prefix = "from pkg.util import helper\n"
    composed = comp.compose(index, "path_distance", "pkg/core.py", prefix, tok.encode(prefix),
                            10_000)
    expected = (f"{repo}proj{after}{sep}docs/notes.md\nnotes{after}{sep}pkg/util.py\n{UTIL}"
                f"{sep}pkg/core.py\n{prefix}")
    assert tok.decode(composed.ids) == expected
    assert composed.files == ["docs/notes.md", "pkg/util.py"]


def test_compose_writes_path_comments_without_both_repository_tokens():
    """A tokenizer without repository tokens writes a path comment before each file and the
    repository's name first; one holding a single repository token writes them too."""
    files = {"pkg/util.py": UTIL, "docs/notes.md": "notes\n"}
    prefix = "from pkg.util import helper\n"
    plain = comp.RepositoryIndex("proj", files, _tokenizer())
    text = _tokenizer().decode(comp.compose(plain, "path_distance", "pkg/core.py", prefix,
                                            _tokenizer().encode(prefix), 10_000).ids)
    assert text == ("# repository: proj\n# docs/notes.md\nnotes\n# pkg/util.py\n" + UTIL
                    + "# pkg/core.py\n" + prefix)
    assert comp.repo_format(_tokenizer("<repo_name>")) == comp.RepoFormat(None, None, "\n")
    assert comp.repo_format(_tokenizer("<file_sep>")) == comp.RepoFormat(None, None, "\n")


def test_the_prefix_starts_at_prefix_start_and_a_budget_of_the_prefix_alone_holds_it():
    """``prefix_start`` is where the completion file's prefix begins in the composed ids, after
    the context and the file's opening (0 for ``empty``); a budget equal to what the prompt
    needs is enough."""
    tok = _tokenizer()
    index = comp.RepositoryIndex("proj", {"pkg/util.py": UTIL}, tok)
    ids = tok.encode(CORE_TEXT)
    for composer in comp.COMPOSERS:
        composed = comp.compose(index, composer, "pkg/core.py", CORE_TEXT, ids, 10_000)
        assert composed.ids[composed.prefix_start:] == ids, composer
        openings = 0 if composer == "empty" else index.openings_length("pkg/core.py")
        exact = comp.compose(index, composer, "pkg/core.py", CORE_TEXT, ids, len(ids) + openings)
        assert exact.ids[exact.prefix_start:] == ids and exact.files == [], composer
    empty = comp.compose(index, "empty", "pkg/core.py", CORE_TEXT, ids, 10_000)
    assert empty.prefix_start == 0


def test_a_files_text_spelling_a_repository_token_stays_text(tmp_path):
    """A file whose code spells <file_sep> (a data-preparation script) is encoded as text, as
    data building encodes it: the composed ids hold one separator a file, not one more where
    the code spells it."""
    from tiny_hf import train_hf_tokenizer
    from tokenizers import AddedToken

    from tokenizer import load_tokenizer

    hf = train_hf_tokenizer("starcoder", [UTIL, EXTRA, CORE_TEXT] * 5, tmp_path / "t.json")
    hf.add_special_tokens([AddedToken("<repo_name>", special=True),
                           AddedToken("<file_sep>", special=True)])
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    script = 'SEP = "<file_sep>"\n'
    index = comp.RepositoryIndex("proj", {"pkg/util.py": UTIL, "tools/pack.py": script}, tok)
    prefix = "x = 1\n"
    composed = comp.compose(index, "path_distance", "pkg/core.py", prefix,
                            tok.encode(prefix, split_special_tokens=True), 10_000)
    separator = tok.token_to_id("<file_sep>")
    assert composed.ids.count(separator) == 3  # two files and the completion file
    assert tok.decode(composed.ids).count("<file_sep>") == 4


def test_compose_fills_the_budget_cutting_the_least_relevant_file_at_its_left():
    """The context fills the budget exactly, the most relevant file last by the prefix, and the
    least relevant cut at its left, keeping its end: no token of the budget is wasted."""
    tok = _tokenizer()
    files = {"pkg/util.py": UTIL, "far/away/file.py": EXTRA * 20}
    index = comp.RepositoryIndex("proj", files, tok)
    prefix = "x = helper(2)"
    ids = tok.encode(prefix)
    budget = len(index.header_ids()) + len(index.opening_ids("pkg/core.py")) + len(ids) + len(
        index.file_ids(index.position["pkg/util.py"])) + 7
    composed = comp.compose(index, "path_distance", "pkg/core.py", prefix, ids, budget)
    assert len(composed.ids) == budget
    assert composed.files == ["far/away/file.py", "pkg/util.py"]
    far = index.file_ids(index.position["far/away/file.py"])
    assert composed.ids[len(index.header_ids()):][:7] == far[-7:]


def test_a_budget_smaller_than_the_prefix_is_one_line():
    """A budget smaller than the prefix is refused in one line by every composer, not a cut
    prefix."""
    tok = _tokenizer()
    index = comp.RepositoryIndex("proj", {"pkg/util.py": UTIL}, tok)
    ids = tok.encode(CORE_TEXT)
    for composer in comp.COMPOSERS:
        with pytest.raises(ValueError, match="smaller than the prefix") as caught:
            comp.compose(index, composer, "pkg/core.py", CORE_TEXT, ids, len(ids) - 1)
        assert "\n" not in str(caught.value)


def test_no_prompt_holds_the_completion_files_future_or_a_later_commit(repo):
    """For every line of the completion file and every composer, the prompt holds neither a
    later line of the file, nor a file or change of a later commit, nor the files the same
    commit adds."""
    case = _core_case(repo)
    tok = _tokenizer()
    index = comp.RepositoryIndex(case.repo, case.snapshot, tok)
    lines = case.text.split("\n")
    last = next(i for i, line in enumerate(lines) if "MARKER_FUTURE" in line)
    for number in range(1, last + 1):  # up to the line holding the file's marker
        prefix = "\n".join(lines[:number])
        for composer in comp.COMPOSERS:
            text = tok.decode(comp.compose(index, composer, case.path, prefix, tok.encode(prefix),
                                           4096).ids)
            assert "MARKER" not in text, (composer, number)
            assert text.endswith(prefix)


@pytest.mark.parametrize("files", [10, 200])
def test_the_index_is_built_once_and_composes_every_file(files):
    """Composing reads the index only: a file's ids are encoded once whatever the calls."""
    tok = _tokenizer()
    snapshot = {f"d{i % 7}/m{i}.py": f"def f{i}(x):\n    return helper(x) + {i}\n"
                for i in range(files)}
    cache = comp.IndexCache()
    index = comp.RepositoryIndex("r", snapshot, tok, cache)
    first = comp.compose(index, "bm25", "d0/new.py", "f3(1)", tok.encode("f3(1)"), 300)
    size = len(cache.ids)
    again = comp.compose(index, "bm25", "d0/new.py", "f3(1)", tok.encode("f3(1)"), 300)
    assert first.ids == again.ids and len(cache.ids) == size
    assert first.files[-1] == "d3/m3.py"  # the file declaring f3 nearest the prefix


def test_records_of_a_case_name_its_commit_and_lines(repo):
    """A case's lines survive a JSON round trip and its id names the repository's commit and the
    file, so a record points to the code it was scored on."""
    case = _core_case(repo)
    assert json.loads(json.dumps(case.lines)) == case.lines
    assert case.id.startswith("proj@") and case.id.endswith(":pkg/core.py")


def test_repository_tokens_are_the_ids_hf_gives_starcoder2s_format(tmp_path):
    """With a StarCoder-family HF tokenizer holding <repo_name> and <file_sep>: the composed
    ids are HF tokenizers' encoding of the StarCoder2 repository text."""
    from tiny_hf import train_hf_tokenizer
    from tokenizers import AddedToken

    from tokenizer import load_tokenizer

    hf = train_hf_tokenizer("starcoder", [UTIL, EXTRA, CORE_TEXT] * 5, tmp_path / "t.json")
    hf.add_special_tokens([AddedToken("<repo_name>", special=True),
                           AddedToken("<file_sep>", special=True)])
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    index = comp.RepositoryIndex("proj", {"pkg/util.py": UTIL, "pkg/extra.py": EXTRA}, tok)
    prefix = '"""Core."""\nfrom pkg.util import helper'
    composed = comp.compose(index, "imports", "pkg/core.py", prefix,
                            tok.encode(prefix, split_special_tokens=True), 10_000)
    text = ("<repo_name>proj<file_sep>pkg/extra.py\n" + EXTRA + "<file_sep>pkg/util.py\n" + UTIL
            + "<file_sep>pkg/core.py\n" + prefix)
    assert composed.ids == hf.encode(text, add_special_tokens=False).ids


# ---- The project-completion evaluation task ------------------------------------------------------

@pytest.fixture
def tiny_model(tmp_path) -> Path:
    """A tiny llama with a code tokenizer trained on the repository's files."""
    from tiny_hf import save_tiny_hf

    tok = _tokenizer()
    base = tmp_path / "base"
    save_tiny_hf("llama", base, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                 eos_token_id=tok.eos_id)
    tok.save(base)
    return base


def test_the_empty_composer_alone_completes_without_context_and_says_so(repo, tiny_model,
                                                                        tmp_path, capsys):
    """--composers empty scores the baseline alone: no composer is said to be chosen."""
    import eval as ev

    assert ev.main(["--models", str(tiny_model), "--tasks", "project-completion", "--data",
                    str(repo), "--composers", "empty", "--limit", "1", "--lines-per-file", "1",
                    "--max-new-tokens", "2", "--block-size", "512", "--no-progress",
                    "--device", "cpu", "--out-dir", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "no composer gives context (--composers empty)" in err and "chosen by" not in err


def test_eval_scores_every_category_under_every_composer_without_leaks(repo, tiny_model,
                                                                       tmp_path, monkeypatch,
                                                                       capsys):
    """eval.py --tasks project-completion --data REPO: per composer, its perplexity and EM/ES
    per category (LCA's: stripped lines equal; fuzz ratio), the chosen composer's repeated;
    no prompt the model sees holds a later line or commit."""
    from rapidfuzz import fuzz

    import eval as ev
    from codelm.models.engine import Engine

    seen = []
    add = Engine.add

    def recording(self, prompt, cfg, *args, **kwargs):
        seen.append(list(prompt))
        return add(self, prompt, cfg, *args, **kwargs)

    monkeypatch.setattr(Engine, "add", recording)
    out = tmp_path / "out"
    assert ev.main(["--models", str(tiny_model), "--tasks", "project-completion", "--data",
                    str(repo), "--limit", "3", "--lines-per-file", "2", "--max-new-tokens", "4",
                    "--block-size", "512", "--no-progress", "--device", "cpu",
                    "--out-dir", str(out)]) == 0
    err = capsys.readouterr().err
    assert "chosen by lowest perplexity among the composers that give context" in err, err
    assert "empty is the baseline" in err
    results = json.loads((out / "results.json").read_text())
    metrics = results["rows"][0]["metrics"]
    for composer in ("empty", "path_distance", "imports", "bm25"):
        assert metrics[f"project-completion/{composer}/perplexity"] > 1
        for category in history.CATEGORIES:
            assert 0 <= metrics[f"project-completion/{composer}/EM_{category}"] <= 100
            assert 0 <= metrics[f"project-completion/{composer}/ES_{category}"] <= 100
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    chosen = next(r for r in records if r.get("id") == "composer")["chosen"]
    assert metrics["project-completion/chosen/EM"] == metrics[f"project-completion/{chosen}/EM"]
    lines = [r for r in records if r.get("category")]
    for r in lines:  # LCA's scores of each line: stripped lines equal, fuzzywuzzy's ratio
        assert r["exact"] == (r["prediction"].strip() == r["reference"].strip())
        assert r["edit_sim"] == round(fuzz.ratio(r["prediction"], r["reference"]))
    for composer, category in [("bm25", "inproject"), ("empty", "random")]:  # a file's mean,
        per_case: dict[str, list[bool]] = {}                              # then the files'
        for r in lines:
            if r["composer"] == composer and r["category"] == category:
                per_case.setdefault(r["case"], []).append(r["exact"])
        means = [100 * sum(v) / len(v) for v in per_case.values()]
        assert metrics[f"project-completion/{composer}/EM_{category}"] == pytest.approx(
            sum(means) / len(means))
    tok = _tokenizer()
    assert len(seen) == len(lines)
    assert not [ids for ids in seen if "MARKER" in tok.decode(ids)]


def test_a_line_is_scored_as_lca_scores_it():
    """Exact match on the stripped lines; edit similarity on the lines as they are, so a line
    with the right code at the wrong indentation matches exactly but is not 100 similar."""
    from codelm.evaluation.tasks.project import line_scores

    assert line_scores("x = 1", "    x = 1") == {"exact": True, "edit_sim": 71}
    assert line_scores("    x = 2", "    x = 1")["edit_sim"] == 89
    assert line_scores("    x = 1", "    x = 1") == {"exact": True, "edit_sim": 100}


def test_exact_match_is_a_percentage_averaged_per_file_then_over_files():
    """EM is in percent as edit similarity is (and codelm's line task's EM): file A gets one of
    its two lines, file B its one line: (50 + 100) / 2 = 75, not the lines' 2 / 3."""
    from codelm.evaluation.tasks.project import _aggregate, category_table

    rows = [("A", True, 100), ("A", False, 50), ("B", True, 100)]
    records = [{"composer": "bm25", "category": "inproject", "case": case, "exact": exact,
                "edit_sim": es} for case, exact, es in rows]
    metrics = _aggregate(records, ["bm25"])
    assert metrics["bm25/EM_inproject"] == pytest.approx(75.0)
    assert metrics["bm25/ES_inproject"] == pytest.approx(87.5)
    assert metrics["bm25/EM"] == pytest.approx(75.0)
    table = category_table({**metrics, "bm25/perplexity": 3.0}, ["bm25"], "m")
    assert "| bm25 | 3.000 | n/a | 75.0 (87.5) |" in table


def test_a_composers_perplexity_is_the_mean_of_its_files_perplexities(tiny_model):
    """As LCA's evaluation scores a composer (each completion file's perplexity, the exponent
    of its scored tokens' mean loss, then their mean over files): a long file and a short one
    count alike, whatever their tokens, checked against the model's logits."""
    import torch
    import torch.nn.functional as F

    from codelm import loading
    from codelm.evaluation.config import EvalConfig
    from codelm.evaluation.tasks.project import composer_perplexity

    lm = loading.load_model(str(tiny_model), "cpu")
    context = 128
    cfg = EvalConfig(block_size=context, batch_size=2, progress=False)
    index = comp.RepositoryIndex("proj", {"pkg/util.py": UTIL}, lm.tokenizer)
    cases = [{"id": "core", "path": "pkg/core.py", "text": CORE_TEXT},
             {"id": "extra", "path": "pkg/extra.py", "text": EXTRA}]
    composers = ["empty", "path_distance"]
    got = composer_perplexity(lm, cases, composers, cfg, {"core": index, "extra": index})
    budget = context + 1 - len(lm.prompt_start)
    for composer in composers:
        perplexities = []
        for case in cases:
            room = budget - index.openings_length(case["path"])
            file_ids = lm.tokenizer.encode(case["text"], split_special_tokens=True)
            file_ids = file_ids[: min(context // 2, room)]
            composed = comp.compose(index, composer, case["path"], case["text"], file_ids,
                                    budget)
            ids = torch.tensor([*lm.prompt_start, *composed.ids])
            with torch.no_grad():
                logits = lm.model(ids[None, :-1])[0]
            first = len(lm.prompt_start) + composed.prefix_start  # predicts the second token
            loss = F.cross_entropy(logits[first:].float(), ids[first + 1 :])
            perplexities.append(float(torch.exp(loss)))
        assert perplexities[0] != pytest.approx(perplexities[1])
        assert got[composer] == pytest.approx(sum(perplexities) / len(perplexities), rel=1e-5)


def test_eval_refuses_project_completion_without_repositories(capsys):
    """eval.py --tasks project-completion without repositories is refused naming --data
    REPO_DIR."""
    import eval as ev

    assert ev.main(["--tasks", "project-completion"]) == 2
    assert "--data REPO_DIR" in capsys.readouterr().err


# ---- The project training task -------------------------------------------------------------------

def _docs(files: dict[str, str], repo: str | None = None, prefix: str = "") -> list:
    from codelm.data.sources import Doc

    return [Doc(f"{repo or prefix}/{path}", text, repo=repo) for path, text in files.items()]


def test_project_examples_are_repository_sequences_then_completion_prompts():
    """Per repository: its text in the composer's order (the first file last) cut in pieces
    trained as text, then per file its drawn lines, each prompted with the repository's other
    files and the lines before it, completed by the line and the file's rest; a repository
    never sees another's files."""
    from codelm.data.config import DataConfig
    from codelm.data.project import project_pairs

    tok = _tokenizer()
    one = {"pkg/core.py": CORE_TEXT, "pkg/util.py": UTIL}
    two = {"lib/extra.py": EXTRA}
    docs = _docs(one, prefix="one") + _docs(two, repo="two")
    cfg = DataConfig(task="project", lines_per_file=2, seed=3)
    pairs = project_pairs(docs, tok, cfg, 4096)
    text_pieces = [tok.decode(c) for p, c, _, _ in pairs if not p]
    assert text_pieces == ["# repository: one\n# pkg/util.py\n" + UTIL + "# pkg/core.py\n"
                           + CORE_TEXT, "# repository: two\n# lib/extra.py\n" + EXTRA]
    prompts = [(tok.decode(p), tok.decode(c)) for p, c, _, _ in pairs if p]
    assert len(prompts) == 2 + 2 + 1  # core, util, extra (one line after its first)
    for prompt, completion in prompts:
        assert completion.startswith("\n") and completion.strip()
        own = "pkg/core.py" if prompt.startswith("# repository: one\n# pkg/util.py") else None
        if own:  # the other file as context, this file's lines up to the line, the rest of
            before = prompt.split("# pkg/core.py\n", 1)[1]  # the file as the completion
            assert before + completion == CORE_TEXT and before.count("\n") > 0
        if prompt.startswith("# repository: one"):
            assert "MARKER_COMMITTED" not in prompt  # repository two's file
    assert all(not ends for _, _, ends, _ in pairs)


def test_project_examples_are_the_same_on_worker_processes(monkeypatch):
    """The project task's examples are built in units of a repository's files on worker
    processes: one repository split over several units, another whole, give the examples and
    the order one process gives."""
    from codelm.data import project
    from codelm.data.config import DataConfig

    tok = _tokenizer()
    one = {f"pkg/m{k}.py": f"# module {k}\n{text}" for k, text in
           enumerate([CORE_TEXT, UTIL, EXTRA, UTIL, CORE_TEXT])}
    docs = _docs(one, prefix="one") + _docs({"lib/extra.py": EXTRA}, repo="two")
    monkeypatch.setattr(project, "MIN_PARALLEL_CHARS", 0)
    built = {}
    for workers in (1, 2):
        cfg = DataConfig(task="project", lines_per_file=2, seed=5, num_workers=workers)
        assert len(project._units(list(project.repositories(docs)), workers)) >= 3
        built[workers] = project.project_pairs(docs, tok, cfg, 512)
    assert built[2] == built[1]
    assert len([p for p, _, _, _ in built[1] if p]) == 2 * 5 + 1  # two lines a file (extra: one)


def test_project_pieces_fit_the_block():
    """Every project training pair fits the block, the completion in at most half of it and holding
    lines after its first: the context the model learns from is never cut away."""
    from codelm.data.config import DataConfig
    from codelm.data.project import project_pairs

    tok = _tokenizer()
    cfg = DataConfig(task="project", lines_per_file=3)
    pairs = project_pairs(_docs({"pkg/core.py": CORE_TEXT, "pkg/util.py": UTIL}, prefix="r"),
                          tok, cfg, 96)
    assert pairs and all(len(p) + len(c) <= 96 for p, c, _, _ in pairs)
    completions = [c for p, c, _, _ in pairs if p]
    assert completions and all(len(c) <= 48 for c in completions)  # half the room at most
    assert any(tok.decode(c).count("\n") > 1 for c in completions)  # lines after the line


def test_repository_pieces_train_every_token_after_the_first_once():
    """A repository's text cut into pieces of any size trains each of its tokens after the
    first exactly once, as lm windows do: a piece after the first opens with the last token of
    the one before (the token that predicts its first), and no piece is a lone token with
    nothing to predict (sizes that leave one token over included). Reference: the text in one
    piece."""
    from codelm.data.config import DataConfig
    from codelm.data.project import project_pairs

    tok = _tokenizer()
    assert tok.template_prefix == []
    docs = _docs({"pkg/core.py": CORE_TEXT, "pkg/util.py": UTIL}, prefix="r")
    cfg = DataConfig(task="project", lines_per_file=0)
    [whole] = [c for _, c, _, _ in project_pairs(docs, tok, cfg, 10**6)]
    rooms = [*range(8, 41), (len(whole) - 1) // 2, len(whole) - 1]
    assert any(len(whole) % room == 1 for room in rooms)
    for room in rooms:
        pieces = [c for _, c, _, _ in project_pairs(docs, tok, cfg, room)]
        assert all(2 <= len(piece) <= room for piece in pieces), room
        assert [t for piece in pieces for t in piece[1:]] == whole[1:], room


def test_max_completion_tokens_cuts_completions_and_never_the_repository_text():
    """max_completion_tokens bounds what a prompted example trains on; the repository
    sequences (pieces with no prompt) are text trained whole: a cut piece's tokens would be
    in no example. With a limit every piece's tokens stay, and completions are cut."""
    import dataset
    from codelm.data.config import DataConfig

    tok = _tokenizer()
    docs = _docs({"pkg/core.py": CORE_TEXT, "pkg/util.py": UTIL}, prefix="r")
    kept = {}
    for limit in (None, 4):
        cfg = DataConfig(task="project", block_size=256, lines_per_file=2, progress=False,
                         num_workers=1, max_completion_tokens=limit)
        with tok.batch_encoder(1) as encoder:
            examples, _ = dataset._chunk_examples(docs, encoder, cfg, "train", None)
        lengths = np.diff(examples.offsets)
        kept[limit] = (sum(n for n, p in zip(lengths, examples.prompt_lens) if p == 0),
                       max(n - p for n, p in zip(lengths, examples.prompt_lens) if p))
    assert kept[4][0] == kept[None][0]  # the repository text, whole
    assert kept[4][1] <= 4 < kept[None][1]  # the completions, cut


def test_project_examples_never_depend_on_where_a_shard_ends(tmp_path, monkeypatch):
    """Data preparation cuts a split into shards of documents; the project task composes each
    repository whole, so a shard ends where a repository does: shards of any size give the
    examples one shard gives."""
    import json

    import dataset
    from codelm.data.config import DataConfig

    texts = [CORE_TEXT, UTIL, EXTRA] * 3
    source = tmp_path / "files.jsonl"
    with open(source, "w") as f:
        for k, text in enumerate(texts):
            f.write(json.dumps({"repo": f"org/r{k // 5}", "path": f"pkg/m{k}.py",
                                "text": f"# module {k}\n{text}"}) + "\n")
    tok = _tokenizer()
    built = {}
    for chars in (10**9, 1500):
        monkeypatch.setattr(dataset, "TOKEN_SHARD_CHARS", chars)
        cfg = DataConfig(task="project", sources=[str(source)], block_size=256, min_lines=1,
                         progress=False, num_workers=1, cache_dir=str(tmp_path / f"c{chars}"),
                         train_frac=1.0, val_frac=0.0, test_frac=0.0, lines_per_file=2)
        built[chars] = np.asarray(dataset.prepare(cfg, tok).train.ids).tobytes()
    assert built[1500] == built[10**9]


def test_a_repositorys_records_in_two_sources_are_composed_as_one_repository(tmp_path):
    """A scraper's file a language (or an unsorted dataset) holds some of a repository's
    files each: the project task gathers them, so the repository's sequence and contexts hold
    all of them, as one source of them in order gives; a Kotlin repository's header is a //
    comment."""
    import json

    import dataset
    from codelm.data.config import DataConfig

    rows = [("org/a", "pkg/core.py", CORE_TEXT), ("org/b", "Main.kt", "fun main() = 1\n" * 3),
            ("org/a", "pkg/util.py", UTIL), ("org/b", "Util.kt", "fun util() = 2\n" * 3)]
    split = {"py": [r for r in rows if r[1].endswith(".py")],
             "kt": [r for r in rows if r[1].endswith(".kt")], "one": sorted(rows)}
    for name, records in split.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"repo": r, "path": p, "text": t}) + "\n" for r, p, t in records))
    tok = _tokenizer()

    def built(*names: str) -> bytes:
        cfg = DataConfig(task="project", sources=[str(tmp_path / f"{n}.jsonl") for n in names],
                         block_size=256, min_lines=1, progress=False, num_workers=1,
                         cache_dir=str(tmp_path / "-".join(names)), train_frac=1.0,
                         val_frac=0.0, test_frac=0.0, lines_per_file=2, dedupe=False)
        return dataset.prepare(cfg, tok)

    spread, whole = built("py", "kt"), built("one")
    assert np.asarray(spread.train.ids).tobytes() == np.asarray(whole.train.ids).tobytes()
    text = tok.decode(np.asarray(whole.train.ids).tolist())
    assert "// repository: org/b" in text and "# repository: org/a" in text


def test_trainingmanager_trains_the_project_task_on_repositories(repo, tmp_path):
    """python trainingmanager.py --task project --data DIR DIR: trains on packed repository
    sequences and completion examples (--packing: several in a row)."""
    import trainingmanager as tm

    other = tmp_path / "other"
    (other / "lib").mkdir(parents=True)
    (other / "lib" / "a.py").write_text(UTIL * 3)
    (other / "lib" / "b.py").write_text(CORE_TEXT * 2)
    (tmp_path / "tok").mkdir()
    _tokenizer().save(tmp_path / "tok")
    out = tmp_path / "runs"
    assert tm.main(["--task", "project", "--data", str(repo), str(other), "--preset", "tiny",
                    "--tokenizer", str(tmp_path / "tok"),
                    "--block-size", "64", "--batch-size", "2", "--max-steps", "2", "--packing",
                    "--no-progress", "--no-export", "--out-dir", str(out), "--name", "p",
                    "--data-options", json.dumps({"cache_dir": str(tmp_path / "cache"),
                                                  "lines_per_file": 2})]) == 0
    metrics = [json.loads(line) for line in (out / "p" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in m for m in metrics)


def test_a_file_too_deep_for_the_parser_declares_its_names_by_the_patterns():
    """A generated expression of thousands of terms makes ast.parse recurse too deep: its
    declarations are read as a file that does not parse is read, and the history goes on."""
    table = "TABLE = (" + " + ".join(f"'row{i}'" for i in range(3000)) + ")\n"
    text = table + "def lookup(i):\n    return TABLE[i]\n"
    assert history.declared_names(text, "gen/table.py") == {"lookup"}


def test_a_name_in_an_f_string_counts_as_python_3_12_tokenizes_it():
    """Python 3.12's tokenizer gives an f-string's expressions as names; an older one gives the
    f-string as one string: each line's names are the same under both (a call of the project's
    function inside an f-string makes the line inproject), and a plain string's braces are
    text."""
    snapshot = {"app/util.py": "def render(x):\n    return str(x)\n"}
    text = ('import sys\nmsg = f"page: {render(sys.argv)}"\nbody = f"""\n  {render(1):>{width}}"""\n'
            'note = "{render}"\n')
    names = history.line_names(text, "app/main.py")
    assert names[1] == {"msg", "render", "sys", "argv"}
    assert names[3] == {"render", "width"} and names[4] == {"note"}
    assert history.line_categories(text, "app/main.py", snapshot, {})["inproject"] == [1, 3]
    # a lone CR inside a triple-quoted f-string ends no line (lines split at LF)
    assert history.line_names('x = f"""a\rb{y}"""\n', "a.py") == [{"x", "y"}, set()]
    assert history.line_names('x = f"""a\r\r\r{y}"""', "a.py") == [{"x", "y"}]


def test_a_string_holding_a_comment_mark_keeps_the_rest_of_its_line_in_other_languages():
    """In Kotlin "#" and "//" inside a string are text: a line calling the project's function
    after such a string is inproject, and the string's words are no names."""
    snapshot = {"src/Net.kt": 'fun buildPath(id: Int): String = "p" + id\n'}
    text = ('package app\nval link = "https://host/" + buildPath(7)\n'
            'val tag = "#" + buildPath(8)\nval plain = buildPath(9)\n')
    assert history.line_names(text, "src/App.kt")[1] == {"val", "link", "buildPath"}
    lines = history.line_categories(text, "src/App.kt", snapshot, {})
    assert lines["inproject"] == [1, 2, 3]


def test_a_hash_opens_no_comment_in_languages_whose_comments_open_with_slashes():
    """In JavaScript, C and Rust "#" opens no comment (a private member, a preprocessor line,
    an attribute): the names after it on its line are read, so a line calling the project's
    function after `this.#cache` is inproject; in Python "#" still opens one."""
    snapshot = {"src/util.js": "export function computeValue(key) {\n  return key;\n}\n"}
    text = ("class Store {\n  get(key) {\n    this.#cache.set(key, computeValue(key));\n"
            "  }\n}\n")
    assert "computeValue" in history.line_names(text, "src/store.js")[2]
    assert history.line_categories(text, "src/store.js", snapshot, {})["inproject"] == [2]
    assert history.line_names("#define TWICE(x) helper(x)\n", "a.c")[0] >= {"helper"}
    assert history.line_names("x = 1  # helper(x)\n", "a.py")[0] == {"x"}


def test_a_rust_lifetime_opens_no_char_literal():
    """In Rust a quote opens a char literal of one character or escape, else a lifetime
    (`&'a str`), which is code: the names after a lifetime are read, so a line calling the
    project's function after one is inproject, and a char literal's text is still left out."""
    snapshot = {"src/store.rs": "pub fn lookup(items: &[u8]) -> u8 {\n    items[0]\n}\n"}
    text = ("fn first<'a>(items: &'a [u8]) -> &'a u8 {\n"
            "    let k: &'a u8 = lookup(items, 'x', '\\n', '\\u{1F600}', '\\'');\n"
            "    k\n}\n")
    assert history.line_names(text, "src/main.rs")[1] == {"let", "k", "a", "u8", "lookup",
                                                          "items"}
    assert history.line_categories(text, "src/main.rs", snapshot, {})["inproject"] == [1]


def test_files_whose_path_fills_a_short_context_are_left_out_and_named(tmp_path, tiny_model,
                                                                         capsys):
    """A model of a short context and a completion file whose repository name and path take it
    all: that file is left out (named on stderr) and the others scored; where none fits, one
    error names --block-size."""
    import eval as ev

    root = tmp_path / "deep"
    root.mkdir()
    _git(root, "init", "-q")
    _commit(root, {"a.py": UTIL}, "start")
    deep = "/".join(["averyveryverylongdirectorynamethatnobodytypes"] * 3) + "/modulename.py"
    _commit(root, {"b.py": _functions("near"), deep: _functions("far")}, "add two files")
    common = ["--models", str(tiny_model), "--tasks", "project-completion", "--data", str(root),
              "--lines-per-file", "1", "--max-new-tokens", "2", "--no-progress", "--device",
              "cpu"]
    assert ev.main([*common, "--block-size", "48", "--out-dir", str(tmp_path / "o1")]) == 0
    err = capsys.readouterr().err
    assert "1 of 2 completion files left out" in err and "a prompt of base may have" in err
    records = [json.loads(line) for line in (tmp_path / "o1" / "predictions.jsonl").open()]
    assert {r["case"].rsplit(":", 1)[1] for r in records if "case" in r} == {"b.py"}
    assert ev.main([*common, "--block-size", "12", "--out-dir", str(tmp_path / "o2")]) == 2
    assert "no room for a file's code" in capsys.readouterr().err


def test_a_completion_file_opening_with_a_blank_line_is_scored(tmp_path, tiny_model):
    """Its second line's prefix is empty: under the empty composer the prompt opens with BOS,
    as LCA's baselines open an empty context, and every drawn line is scored."""
    import eval as ev

    root = tmp_path / "blank"
    root.mkdir()
    _git(root, "init", "-q")
    _commit(root, {"a.py": "def helper(x):\n    return x\n"}, "start")
    body = "\n" + "\n".join(f"value_{i} = helper({i})" for i in range(12)) + "\n"
    _commit(root, {"b.py": body}, "add b")
    out = tmp_path / "out"
    assert ev.main(["--models", str(tiny_model), "--tasks", "project-completion", "--data",
                    str(root), "--lines-per-file", "20", "--max-new-tokens", "2",
                    "--block-size", "256", "--no-progress", "--device", "cpu",
                    "--out-dir", str(out)]) == 0
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert any(r.get("line") == 1 or r.get("id", "").endswith("#1") for r in records)


def test_evals_console_table_shows_the_chosen_composers_columns_and_table_md_every_one():
    """project-completion gives a column per composer, line category and score (its category
    table shows them); eval's console table keeps the chosen composer's, other tasks' columns
    whole, and table.md keeps every column."""
    from codelm.evaluation.results import markdown_table
    from codelm.evaluation.tasks import registry

    row = {"model": "m", "prompt": None,
           "metrics": {"lm/loss": 2.0, "project-completion/empty/perplexity": 9.0,
                       "project-completion/bm25/EM_inproject": 10.0,
                       "project-completion/chosen/EM_inproject": 10.0}}
    console = markdown_table([row], shown=registry.on_console).split("\n")[0]
    assert console == "| model | lm loss | project-completion chosen EM_inproject |"
    full = markdown_table([row]).split("\n")[0]
    assert "project-completion bm25 EM_inproject" in full and "empty perplexity" in full
