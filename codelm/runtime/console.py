"""The console of every script: progress bars shown only on a terminal, with plain lines at
least every HEARTBEAT_S seconds in a log instead (``progress_bar``, ``Heartbeat``), a sweep
worker's labelled lines (``labelled_lines``, ``line_label``), and time spans, sizes and blank
texts as lines give them (``duration``, ``byte_size``, ``blank_text``)."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from functools import cache


class _Labelled:
    """A text stream that starts each non-blank line written to ``stream`` with ``label``. A
    labelled line reaches ``stream`` in one write and a flush, once it ends (or at a flush): two
    processes that share a file then never cut into each other's lines."""

    def __init__(self, stream, label: str) -> None:
        self.stream = stream
        self.label = label
        self.pending = ""  # the start of a line not ended yet
        self.mid_line = False  # a flush wrote the start of the current line to ``stream``

    def write(self, text: str) -> int:
        lines = (self.pending + text).split("\n")
        self.pending = lines.pop()
        if lines:
            self.stream.write("".join(self._labelled(line) + "\n" for line in lines))
            self.stream.flush()  # out now, not cut where a buffer fills
        return len(text)

    def flush(self) -> None:
        if self.pending:
            self.stream.write(self._labelled(self.pending))
            self.pending = ""
            self.mid_line = True
        self.stream.flush()

    def _labelled(self, line: str) -> str:
        if self.mid_line:  # its label went out with its start
            self.mid_line = False
            return line
        return self.label + line if line else line

    def __getattr__(self, name: str):
        return getattr(self.stream, name)  # isatty, fileno, encoding


@contextlib.contextmanager
def labelled_lines(label: str) -> Iterator[None]:
    """Within: each line printed on stdout and stderr starts with ``label`` (a sweep worker's
    ``trial 3: ``, so that two workers' interleaved lines say whose they are)."""
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Labelled(sys.stdout, label), _Labelled(sys.stderr, label)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = streams


def line_label() -> str:
    """The label ``labelled_lines`` starts stderr's lines with now ("" outside it): for a
    message written to the file descriptor itself (a signal handler's)."""
    return sys.stderr.label if isinstance(sys.stderr, _Labelled) else ""


def duration(seconds: float) -> str:
    """A time span as a console line gives it, rounded to its last unit: 4m05s, 1h02m."""
    minutes, secs = divmod(round(seconds), 60)
    if minutes >= 60:
        hours, minutes = divmod(round(seconds / 60), 60)
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s"


def blank_text(text: str) -> str | None:
    """What a console shows in place of a text that holds only whitespace (a run of spaces or
    newlines shows nothing there): its length and its first characters, escaped; None for a
    text with any other character."""
    if text.strip():
        return None
    if not text:
        return "empty"
    shown = repr(text[:20]) + ("..." if len(text) > 20 else "")
    return f"only whitespace: {len(text)} characters, {shown}"


def byte_size(n_bytes: float) -> str:
    """A size as a console line gives it: 1.5 GiB, 12.5 MiB under a GiB, 3.0 KiB under a MiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes / 2**10:.1f} KiB"


# The longest a long phase whose bar is hidden goes without a line (at its next update).
HEARTBEAT_S = 30.0


class Heartbeat:
    """A long phase's plain line on stderr ("tokenize train: 1200/5000 texts, 1m30s, about 4m53s
    left"), at the first update ``every`` seconds (HEARTBEAT_S) after the phase began or its
    last line: what a log gets of a phase whose progress bar is hidden (--no-progress hides
    bars, not the log). The time left is at the rate since the first update: the time before
    it holds the phase's warm-up (a compilation, a cache filled), and the work done before the
    phase began (a resumed one's) is no rate of its own. ``clock``: seconds, monotonic (a
    test's fake)."""

    def __init__(self, desc: str, total: float | None = None, unit: str = "it",
                 initial: float = 0, every: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.desc = desc
        self.total = total
        self.unit = unit
        self.n = initial
        self.every = HEARTBEAT_S if every is None else every
        self.clock = clock
        self.started = self.last = clock()
        self.first_update: tuple[float, float] | None = None  # (time, count) at the first update

    def update(self, n: float = 1) -> None:
        """``n`` more done; the line, if ``every`` seconds passed since the last."""
        self.n += n
        now = self.clock()
        if self.first_update is None:
            self.first_update = (now, self.n)
        if now - self.last >= self.every:
            self.last = now
            from tqdm import tqdm

            tqdm.write(self.line(now), file=sys.stderr)  # above any bar shown

    def line(self, now: float) -> str:
        count = _figure(self.n) if self.total is None else f"{_figure(self.n)}/{_figure(self.total)}"
        plural = "es" if self.unit.endswith(("s", "x", "ch", "sh")) else "s"  # batches
        unit = "" if self.unit == "it" else f" {self.unit}{plural}"
        elapsed = now - self.started
        line = f"{self.desc or 'working'}: {count}{unit}, {duration(elapsed)}"
        if self.total is None or self.first_update is None or self.n >= self.total:
            return line
        first_time, first_count = self.first_update
        if self.n <= first_count or now <= first_time:  # one update so far: no rate past warm-up
            return line
        left = (self.total - self.n) * (now - first_time) / (self.n - first_count)
        return f"{line}, about {duration(left)} left"


_PARTS_OPEN = [0]  # the ``parts_of_a_phase`` blocks under way


@contextlib.contextmanager
def parts_of_a_phase() -> Iterator[None]:
    """Within: the bars made count parts of a phase whose own bar, made outside, says where
    the phase is: they keep no ``Heartbeat`` (a part's line would give its count as the
    phase's)."""
    _PARTS_OPEN[0] += 1
    try:
        yield
    finally:
        _PARTS_OPEN[0] -= 1


def progress_bar(*args, enabled: bool = True, lines: bool = True, **kwargs):
    """A tqdm bar, shown only when asked for and stderr is a terminal: a log file gets no frames.
    A hidden bar counts all the same and, unless ``lines`` is False (a caller with lines of its
    own) or it is made within ``parts_of_a_phase``, keeps a ``Heartbeat``: a plain line at
    least every HEARTBEAT_S seconds of updates."""
    return _bar_class()(*args, disable=not (enabled and sys.stderr.isatty()),
                        lines=lines and not _PARTS_OPEN[0], **kwargs)


@cache
def _bar_class() -> type:
    """tqdm with a hidden bar's Heartbeat (tqdm is imported when a bar is first made)."""
    from tqdm import tqdm

    class Bar(tqdm):
        def __init__(self, *args, lines: bool = True, **kwargs) -> None:
            self.heartbeat = None
            super().__init__(*args, **kwargs)
            if self.disable and lines:
                self.heartbeat = Heartbeat(kwargs.get("desc") or "", self.total,
                                           kwargs.get("unit", "it"), self.n)

        def update(self, n: float = 1) -> bool | None:
            if not self.disable:
                return super().update(n)
            self.n += n  # a hidden tqdm counts nothing
            if self.heartbeat is not None:
                self.heartbeat.total = self.total  # a caller may change it
                self.heartbeat.update(n)
            return None

        def __iter__(self):
            if not self.disable:
                yield from super().__iter__()
                return
            for item in self.iterable:
                yield item
                self.update(1)

    return Bar


def _figure(n: float) -> str:
    """A count as a reader reads it: 1234567, not 1.23457e+06; 2.5 where it has a fraction."""
    return str(int(n)) if float(n).is_integer() else f"{n:.1f}"
