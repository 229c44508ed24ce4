"""Progress lines: a rewriting line on a terminal, a line per interval in a file, quiet, the job's ETA."""

import io
import os

import pytest

from mcr_jax import progress


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


@pytest.fixture
def out():
    """A stream and a fake clock; progress back to its defaults afterwards."""
    stream, clock = io.StringIO(), Clock()
    progress.reset()
    progress.configure(stream=stream, clock=clock, live=False, interval_s=30)
    yield stream, clock
    progress.reset()


def _epochs(clock, label, epochs, seconds):
    for e in range(1, epochs + 1):
        clock.t += seconds
        progress.epoch_report(label, e, epochs, f"val {e}", unit_eta=(epochs - e) * seconds)


def test_a_file_gets_a_line_per_interval_and_the_summary(out):
    stream, clock = out
    _epochs(clock, "joint seed 0", 100, 1.0)  # 100 s of 1 s epochs, interval 30 s
    progress.run_done("joint seed 0", "done in 100 s")
    lines = stream.getvalue().splitlines()
    epochs = [int(line.split("] epoch ")[1].split("/")[0]) for line in lines[:-1]]
    assert epochs == [1, 31, 61, 91]  # the first epoch, then one every 30 s
    assert lines[-1] == "[joint seed 0] done in 100 s"
    assert "\r" not in stream.getvalue()


def test_interval_zero_prints_every_epoch(out):
    stream, clock = out
    progress.configure(interval_s=0)
    _epochs(clock, "m", 7, 0.01)
    assert len(stream.getvalue().splitlines()) == 7


def test_a_terminal_gets_one_line_per_method_that_rewrites_itself(out):
    stream, clock = out
    progress.configure(live=True)
    _epochs(clock, "joint seed 0", 3, 1.0)
    progress.say("a note")
    progress.run_done("joint seed 0", "done in 3 s")
    _epochs(clock, "mcr seed 0", 2, 1.0)
    progress.run_done("mcr seed 0", "done in 2 s")
    text = stream.getvalue()
    # What a terminal shows once "\r\x1b[K" (back to the start, clear the line) has been applied.
    shown = [line.split("\r\x1b[K")[-1] for line in text.split("\n")]
    assert shown == ["a note", "[joint seed 0] done in 3 s", "[mcr seed 0] done in 2 s", ""]
    assert text.count("[joint seed 0] epoch") == 4  # 3 epochs and the redraw after the note


def test_quiet_prints_warnings_only(out):
    stream, clock = out
    progress.configure(quiet=True)
    _epochs(clock, "m", 3, 1.0)
    progress.run_done("m", "done")
    progress.say("a note")
    progress.say("a damaged file", warning=True)
    assert stream.getvalue() == "a damaged file\n"


def test_the_job_eta_adds_the_mean_unit_time_for_the_units_not_started(out):
    stream, clock = out
    progress.configure(interval_s=0)
    progress.job(4)
    with progress.unit("a"):
        clock.t += 10.0  # compile and the first unit's epochs: 10 s in all
        progress.epoch_report("a", 1, 1, "", unit_eta=0.0)
    with progress.unit("b"):  # found finished: no time, not in the mean
        pass
    with progress.unit("c"):
        clock.t += 2.0
        progress.epoch_report("c", 1, 2, "", unit_eta=3.0)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "[a] epoch 1/1  ETA 0 s · job 1/4, ETA 30 s"  # a's 10 s for each of the 3 others
    assert lines[1] == "[b] already finished: results reused"
    assert lines[2] == "[c] epoch 1/2  ETA 3 s · job 3/4, ETA 13 s"  # 3 s of c, then d at a's 10 s
    progress.job(0)
    progress.epoch_report("alone", 1, 2, "", unit_eta=5.0)
    assert "job" not in stream.getvalue().splitlines()[-1]


def test_the_first_unit_projects_its_own_time(out):
    stream, clock = out
    progress.configure(interval_s=0)
    progress.job(3)
    with progress.unit("a"):
        clock.t += 4.0
        progress.epoch_report("a", 1, 3, "val 0.5", unit_eta=None)  # after a first epoch (it compiles): unknown
        progress.epoch_report("a", 2, 3, "", unit_eta=4.0)  # a will take 8 s: the others as long
    assert stream.getvalue().splitlines() == ["[a] epoch 1/3 · job 1/3  val 0.5",
                                              "[a] epoch 2/3  ETA 4 s · job 1/3, ETA 20 s"]


def test_durations_read_as_a_person_writes_them():
    assert [progress.duration(s) for s in (0.4, 59, 61, 3599, 3600 * 2 + 60 * 5)] == [
        "0 s", "59 s", "1 min 01 s", "59 min 59 s", "2 h 05 min"]
    with pytest.raises(ValueError, match="interval_s"):
        progress.configure(interval_s=-1)


def test_a_live_line_is_cut_to_the_terminal_width(out, monkeypatch):
    # "\r" returns to the start of the last screen row only: a wrapped line could not be rewritten.
    stream, clock = out
    progress.configure(live=True)
    monkeypatch.setattr(progress.shutil, "get_terminal_size", lambda fallback=None: os.terminal_size((40, 24)))
    progress.epoch_report("mcr × 5 runs", 3, 40, "best val accuracy " + " ".join(["0.9312"] * 5), unit_eta=61.0)
    shown = stream.getvalue()
    assert len(shown) == 39 and shown.startswith("[mcr × 5 runs] epoch 3/40  ETA 1 min") and shown.endswith("…")
    progress.run_done("mcr × 5 runs", "done in 80 s: best epochs 1 2 3 4 5; test accuracy " + "0.9 " * 10)
    assert stream.getvalue().endswith("0.9 \n")  # a line that stays is printed whole
