"""console: a long phase's lines when its progress bar is hidden, and a worker's labelled lines."""

import io
import sys

import pytest

from codelm.runtime import console


class Clock:
    """A fake monotonic clock: ``now`` seconds, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_heartbeat_says_where_its_phase_is_once_30_seconds_have_passed(capsys):
    """No line before HEARTBEAT_S (30 s) of the phase, one at the first update after, with the
    count, its total, the unit, the time and the time left at the rate since the first update;
    the next 30 s after that line."""
    clock = Clock()
    beat = console.Heartbeat("base humaneval", total=164, unit="prompt", clock=clock)
    for _ in range(3):  # 29 s: quiet
        clock.now += 9.7
        beat.update(8)
    assert capsys.readouterr().err == ""
    clock.now += 1.0
    beat.update(8)
    # 24 prompts in the 20.4 s since the first update: 132 left take 112 s
    assert capsys.readouterr().err == "base humaneval: 32/164 prompts, 0m30s, about 1m52s left\n"
    clock.now += 29.0
    beat.update(8)
    assert capsys.readouterr().err == ""
    clock.now += 61.0
    beat.update(2)
    assert capsys.readouterr().err == "base humaneval: 42/164 prompts, 2m00s, about 6m36s left\n"


def test_the_time_left_is_at_the_rate_since_the_first_update():
    """The first update's time holds the phase's warm-up (a compiled model's first batch
    compiles it), and a resumed phase's work done before it began is no rate of its own: the
    time left counts from the first update, and after that update alone the line names none;
    nor does a phase without a total, or at its total."""
    clock = Clock()
    beat = console.Heartbeat("eval", total=20, unit="batch", clock=clock)
    clock.now += 32.0  # the first batch compiles the model
    beat.update(1)
    assert beat.line(clock.now) == "eval: 1/20 batches, 0m32s"
    clock.now += 2.0
    beat.update(2)
    assert beat.line(clock.now) == "eval: 3/20 batches, 0m34s, about 0m17s left"
    resumed = console.Heartbeat("score", total=100, unit="prompt", initial=50, clock=clock)
    clock.now += 2.0
    resumed.update(5)
    clock.now += 10.0
    resumed.update(5)  # 5 in 10 s since the first update: 40 left take 80 s
    assert resumed.line(clock.now) == "score: 60/100 prompts, 0m12s, about 1m20s left"
    resumed.update(40)
    assert resumed.line(clock.now) == "score: 100/100 prompts, 0m12s"
    assert console.Heartbeat("read", unit="file", clock=lambda: 0.0).line(10.0) == (
        "read: 0 files, 0m10s")


def test_a_hidden_bar_counts_and_keeps_a_heartbeat_a_shown_one_does_not(monkeypatch, capsys):
    """--no-progress (or a log file) hides the bar, not the log: iterated or updated, a hidden
    bar says where it is (each update here: HEARTBEAT_S 0); ``lines=False`` (a caller with its
    own lines) and a shown bar give no such line."""
    monkeypatch.setattr(console, "HEARTBEAT_S", 0)
    assert list(console.progress_bar(range(3), desc="tokenize train", unit="text",
                                     enabled=False)) == [0, 1, 2]
    err = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in err] == [f"tokenize train: {n}/3 texts"
                                                    for n in (1, 2, 3)]
    with console.progress_bar(desc="read and clean", unit="file", initial=5,
                              enabled=False) as bar:
        bar.update(2)
    assert bar.n == 7 and capsys.readouterr().err.startswith("read and clean: 7 files, ")
    for _ in console.progress_bar(range(2), desc="eval", unit="batch", enabled=False):
        pass
    assert capsys.readouterr().err.startswith("eval: 1/2 batches, ")
    with console.progress_bar(total=4, desc="train", enabled=False, lines=False) as bar:
        bar.update(4)
    assert capsys.readouterr().err == ""
    shown = io.StringIO()
    monkeypatch.setattr(sys, "stderr", shown)
    monkeypatch.setattr(shown, "isatty", lambda: True, raising=False)
    with console.progress_bar(total=2, desc="bar", file=shown) as bar:
        bar.update(2)
    assert "bar: 2/2 its" not in shown.getvalue() and "2/2" in shown.getvalue()  # tqdm's frame


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_labelled_lines_start_every_line_written_within_with_the_label(stream, capsys):
    """Each line a sweep worker's trial prints (whole, in pieces, or several at once) starts
    with the trial's label, a blank line left blank; the streams are given back after."""
    with console.labelled_lines("trial 3: "):
        out = getattr(sys, stream)
        out.write("step 1/4 | loss 2.0\neval step")
        out.write(" 2/4\n\n")
        print("done", file=out)
    print("after", file=getattr(sys, stream))
    text = getattr(capsys.readouterr(), stream.replace("std", ""))
    assert text == "trial 3: step 1/4 | loss 2.0\ntrial 3: eval step 2/4\n\ntrial 3: done\nafter\n"


class _Writes(io.StringIO):
    """A stream that keeps each write apart, as an unbuffered file shared by two processes
    receives them."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def test_a_labelled_line_reaches_the_stream_in_one_write(monkeypatch):
    """print() writes a line and its newline apart; the labelled stream joins them so that
    another process writing the same file between the two cannot cut the line. A flush in the
    middle of a line writes its start, and its end goes on without a second label."""
    shared = _Writes()
    monkeypatch.setattr(sys, "stdout", shared)
    with console.labelled_lines("trial 1: "):
        print("eval step 2/4 | val loss 6.2")
        print("a", "b", sep=" | ")
        sys.stdout.write("step 3")
        sys.stdout.flush()
        sys.stdout.write("/4\n")
        sys.stdout.write("unended")
    assert shared.writes == ["trial 1: eval step 2/4 | val loss 6.2\n", "trial 1: a | b\n",
                             "trial 1: step 3", "/4\n", "trial 1: unended"]


def test_duration_reads_as_minutes_and_hours():
    """A duration reads as minutes and seconds under an hour and as hours and minutes from there,
    rounded to its last unit (1h01m for an hour and 59 s); a plain line comes at least every
    30 s of a log's progress."""
    assert [console.duration(s) for s in (5, 65.4, 3599.6, 3659, 3720, 7199.9)] == [
        "0m05s", "1m05s", "1h00m", "1h01m", "1h02m", "2h00m"]
    assert console.HEARTBEAT_S == 30
